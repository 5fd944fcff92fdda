"""The paged KV cache of one attention layer and its decode step.

One buffer of ``slots`` token positions per (sequence, KV head) holds the keys and values; it is
cut into pages of ``page_size`` slots. A page slot is empty or holds one logical page (logical page
g = tokens g*page_size .. g*page_size+page_size-1 of that sequence). All bookkeeping is kept in
fixed-shape tensors updated in place, so a decode step compiles to one graph and replays under CUDA
graphs:

    page_id   int64 [B, Hkv, P]   logical page in each page slot, -1 when empty
    stamp     int64 [B, Hkv, P]   decode step at which the page was opened or last refreshed
    pinned    bool  [B, Hkv, P]   never evicted (prompt pages under RaaS, sinks under streaming)
    score     fp32  [B, Hkv, P]   policy accumulator (H2O's accumulated attention), last importance
    kmax/kmin       [B, Hkv, P, D] element-wise key max/min per page (Quest's page bound)
    open_slot int64 [B, Hkv]      page slot of the newest (open) page
    length    int64 [B]           tokens written to each sequence (prompt without padding + decoded)
    step      int64 []            decode steps taken (prefill is step 0)

A decode step (:meth:`PagedKVCache.decode`) appends one token per sequence (opening a page, evicting
one if the buffer is full), attends over the resident tokens, then lets the policy observe the query
(RaaS refreshes the timestamps of the most important pages). How it runs is the cache's
``backend``, fixed when the cache is built:

    torch    the torch code below (append, validity mask, flex_attention, the policy's observe): the
             reference, every policy, every device
    flex     one Triton bookkeeping kernel (append, eviction, validity row, exact block lists and,
             for raas with the bound and top-k, the observe) then flex_attention (quest: over the
             pages it picks, by the bounds and pick kernels); CUDA; every policy
    triton   the whole step in one Triton kernel (raas, h2o: shares from the attention's pass;
             streaming and dense: no observe); quest: the append, bounds and pick kernels, then a
             Triton attention over the picked pages through their list; CUDA; every policy

The bound observe reads only the query and the key bounds after the append, so the fused kernels
run it before the attention; the state is that of the torch order (append, attend, observe).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from . import kernels
from .config import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, AttentionSpec, PromptTooLongError, RaaSConfig, prompt_slots
from .masks import all_partial_lists, build_block_mask


def default_kernel_options(device: torch.device, dtype: torch.dtype, block: int) -> dict | None:
    """Flex decode kernel settings for the packed-GQA layout: on CUDA with 16-bit K/V, 64-key tiles,
    3 pipeline stages, 2 warps (docs/kernels.md); fp32 and CPU keep flex's own defaults."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return {"BLOCK_N": min(64, block), "num_stages": 3, "num_warps": 2}


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def backend_unsupported(backend: str, config: RaaSConfig, device: torch.device, dtype: torch.dtype,
                        spec: AttentionSpec = AttentionSpec(), head_dim: int | None = None) -> str | None:
    """Why ``backend`` cannot serve this config, device, K/V dtype, layer and head_dim (None: it can)."""
    if backend == "torch":
        return None
    policy = config.policy
    if spec.window is not None and (backend == "flex" or policy.narrows):
        return (f"a sliding window ({spec}) is served by the one-kernel step (backend='triton') of a policy that "
                f"attends every resident page; got backend={backend!r}, policy={policy.name!r}")
    reason = kernels.unsupported_reason(device, dtype)
    if reason is not None:
        return reason
    if head_dim is not None and head_dim & (head_dim - 1):
        return f"the fused kernels need a head_dim that is a power of two; got head_dim={head_dim}"
    if policy.append_code is None:
        return f"the fused backends serve policies with an eviction rule (append_code); got policy={policy.name!r}"
    if backend == "triton" and policy.step_observe in (1, 2, 3) and config.page_size & (config.page_size - 1):
        return f"the one-kernel step sums attention shares over pages of 2^n tokens; got page_size={config.page_size}"
    return None


def resolve_backend(config: RaaSConfig, device: torch.device, dtype: torch.dtype,
                    spec: AttentionSpec = AttentionSpec(), head_dim: int | None = None) -> str:
    """``config.backend`` if it can serve (else ValueError with the reason), or for None the fastest
    checked one: triton, then flex, on CUDA; torch elsewhere."""
    if config.backend is not None:
        why = backend_unsupported(config.backend, config, device, dtype, spec, head_dim)
        if why is not None:
            raise ValueError(f"backend={config.backend!r} is not supported for this cache: {why}; "
                             "use backend=None (the fastest supported) or backend='torch'")
        return config.backend
    if device.type == "cuda" and config.policy.append_code is not None:
        for backend in ("triton", "flex"):
            if backend_unsupported(backend, config, device, dtype, spec, head_dim) is None:
                return backend
    return "torch"


@dataclass(frozen=True)
class PageState:
    """A snapshot (copies) of one layer's page table. Shapes: [B, Hkv, P] unless noted."""

    page_id: Tensor  # logical page per slot, -1 if empty
    stamp: Tensor  # last-used decode step
    pinned: Tensor  # bool
    score: Tensor  # policy accumulator / last importance
    open_slot: Tensor  # [B, Hkv]
    length: Tensor  # [B] tokens written
    fill: Tensor  # [B] tokens in the newest page, 1..page_size (0 while the row has no token)
    step: Tensor  # [] decode steps taken
    evictions: Tensor  # [B, Hkv] pages evicted so far
    overflow: Tensor  # [] bool: a token found no slot (capacity exceeded); results are invalid

    @property
    def resident_tokens(self) -> Tensor:
        """[B, Hkv] tokens currently held."""
        ps = self.page_size
        first = self.page_id.clamp(min=0) * ps
        n = (self.length[:, None, None] - first).clamp(0, ps)
        return torch.where(self.page_id >= 0, n, 0).sum(-1)

    page_size: int = 16


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without an op when it already is (the CPU step counts its ops)."""
    return t if t.dtype == dtype else t.to(dtype)


def _validate_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


class PagedKVCache(nn.Module):
    """KV cache of one attention layer under a RaaS-style policy (``config.policy``).

    Args:
        config: cache-wide settings and the policy (see :class:`raas_flex.RaaSConfig`).
        batch_size, num_heads (query heads), num_kv_heads, head_dim: attention shape.
        dtype, device: of the K/V buffers.
        scale: softmax scale (default head_dim ** -0.5).
        max_length: tokens per sequence for the O(N) policies (overrides config.max_length).

    ``backend`` (read-only) is the decode path, resolved from ``config.backend`` at construction.
    """

    def __init__(
        self,
        config: RaaSConfig,
        *,
        batch_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        scale: float | None = None,
        max_length: int | None = None,
        spec: AttentionSpec = AttentionSpec(),
    ) -> None:
        super().__init__()
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
        if not isinstance(config, RaaSConfig):
            raise TypeError(f"config must be a RaaSConfig, got {type(config).__name__}")
        for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        # type checks first: 16.0 == 16 would pass the membership test and "float32" would match
        # the dtype names, then fail inside torch.zeros with a message that names neither
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim must be an int, got {head_dim!r} ({type(head_dim).__name__})")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim!r} is not supported; allowed: {SUPPORTED_HEAD_DIMS}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r} ({type(dtype).__name__})")
        if str(dtype).removeprefix("torch.") not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={dtype} is not supported; allowed: {', '.join(SUPPORTED_DTYPES)}")
        device = torch.device(device)
        self.config = config
        self.policy = config.policy
        self.B, self.Hq, self.H, self.D = batch_size, num_heads, num_kv_heads, head_dim
        self.G = num_heads // num_kv_heads
        self.ps = self.page_size = config.page_size
        self.budget_pages = config.budget_pages
        self.S = config.slots(max_length)
        self.P = self.S // self.ps
        self.block = config.kernel_block(self.S)
        if device.type == "cuda" and self.block < 16:
            raise ValueError(
                f"the GPU flex kernel needs KV blocks of >= 16 tokens; buffer of {self.S} slots "
                f"gives block_size={self.block}. Use a budget that is a multiple of 16 or set block_size"
            )
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.spec = spec
        self._backend = resolve_backend(config, device, dtype, spec, head_dim)
        self._compile_flex = device.type == "cuda" if config.compile_flex is None else config.compile_flex
        # on CPU without compiled flex, attention is the softmax over the buffer with the exact validity
        # mask written out: the same softmax over the same slots, without eager flex's per-call vmap
        # machinery (which made a small model's decode several times slower than dense)
        self._sdpa = device.type == "cpu" and not self._compile_flex
        self._kernel_options = default_kernel_options(device, dtype, self.block)
        # the fused kernels' eviction and observe parameters (policy hyperparameters at this budget)
        self._sink_pages, self._recent_pages, self._refresh_pages, self._threshold = self.policy.kernel_params(
            self.budget_pages, self.ps)

        B, H, P, S, D = batch_size, num_kv_heads, self.P, self.S, head_dim
        buf = functools.partial(self.register_buffer, persistent=False)
        buf("k", torch.zeros(B, H, S, D, dtype=dtype, device=device))
        buf("v", torch.zeros(B, H, S, D, dtype=dtype, device=device))
        buf("page_id", torch.full((B, H, P), -1, dtype=torch.int64, device=device))
        buf("stamp", torch.zeros(B, H, P, dtype=torch.int64, device=device))
        buf("pinned", torch.zeros(B, H, P, dtype=torch.bool, device=device))
        buf("score", torch.zeros(B, H, P, dtype=torch.float32, device=device))
        buf("kmax", torch.zeros(B, H, P, D, dtype=dtype, device=device))
        buf("kmin", torch.zeros(B, H, P, D, dtype=dtype, device=device))
        buf("open_slot", torch.zeros(B, H, dtype=torch.int64, device=device))
        buf("length", torch.zeros(B, dtype=torch.int64, device=device))
        buf("step", torch.zeros((), dtype=torch.int64, device=device))
        buf("evictions", torch.zeros(B, H, dtype=torch.int64, device=device))
        buf("overflow", torch.zeros((), dtype=torch.bool, device=device))
        # slots attended in the current step; the mask_mod reads this buffer (the CPU flex template
        # only accepts graph inputs, not intermediates, inside mask_mod)
        buf("valid", torch.zeros(B * H, S, dtype=torch.bool, device=device))
        # a step's new key as the transformers cache hands it to the attention function (hf_cache)
        buf("k_new", torch.zeros(B, H, 1, D, dtype=dtype, device=device))
        if spec.sinks:  # learned sink logit per query head, as [B*Hkv, G, 1] (set_sinks)
            buf("sink_logits", torch.zeros(H, self.G, dtype=torch.float32, device=device))
        # constants used by the step (buffers, so that the step allocates nothing that grows)
        buf("slot_index", torch.arange(P, device=device))
        buf("_tok_ar", torch.arange(self.ps, device=device))
        # first row of each (sequence, KV head) in the flattened [B*H*P, ...] page tables: a step's row
        # writes index one flat dimension (few ops eager, one in-place scatter compiled)
        buf("_row0", torch.arange(B * H, device=device).view(B, H) * P)
        # Block lists. torch backend: constant lists (every block partial: in a full compacted buffer
        # nearly every block is full anyway, and the one-byte mask costs the kernel less than exact
        # lists cost the step). flex backend: the bookkeeping kernel writes exact lists into them;
        # triton: fused_step too. A policy that picks pages lists its pages each step (``_narrow``).
        lists = all_partial_lists(B * H, S, self.block, device)
        for name, t in zip(("_kv_num", "_kv_idx", "_full_num", "_full_idx"), lists):
            buf(name, t)
        self._lists = (self._kv_num, self._kv_idx, self._full_num, self._full_idx)
        if self._backend != "torch":
            buf("_imp", torch.zeros(B, H, P, dtype=torch.float32, device=device))  # page bounds / shares scratch
            buf("_ticket", torch.zeros(1, dtype=torch.int32, device=device))  # programs finished
            buf("_obs_count", torch.zeros(B * H, dtype=torch.int32, device=device))  # per-row programs finished
        if device.type == "cuda":
            # CUDA graphs need stable addresses for state mutated inside the captured step.
            for t in self.buffers():
                torch._dynamo.mark_static_address(t)

    # ------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The decode path: "torch", "flex" or "triton" (fixed at construction, see RaaSConfig.backend)."""
        return self._backend

    @property
    def window_fits(self) -> bool:
        """A sliding-window cache whose buffer keeps every token of the window however pages fall (its
        policy evicts the oldest page, nothing pinned): attention is then exactly the model's."""
        w = self.spec.window
        return (w is not None and self.policy.name == "streaming" and self.policy.sink_tokens == 0
                and not self.policy.pin_prompt and (self.P - 1) * self.ps >= w)

    @property
    def kv_bytes(self) -> int:
        """Bytes allocated for K and V (what the budget bounds)."""
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def state_bytes(self) -> int:
        """Bytes of every buffer this cache allocated (K/V plus page table)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def page_state(self) -> PageState:
        """Copies of the page table (for tests, plots and debugging; syncs nothing itself)."""
        fill = self.length - (self.length - 1).clamp(min=0) // self.ps * self.ps
        names = ("page_id", "stamp", "pinned", "score", "open_slot", "length", "step", "evictions", "overflow")
        return PageState(**{n: getattr(self, n).clone() for n in names}, fill=torch.where(self.length > 0, fill, 0),
                         page_size=self.ps)

    def check(self) -> None:
        """Raise if a token ever found no slot (host sync: call outside the decode loop)."""
        if bool(self.overflow):
            raise RuntimeError(
                f"policy={self.policy.name!r}: a token found no free or evictable page in a buffer of "
                f"{self.S} slots; the output after that point is invalid. Raise max_length/budget."
            )

    def reset(self) -> None:
        """Empty the cache in place (buffers keep their addresses)."""
        self.page_id.fill_(-1)
        for t in (self.stamp, self.score, self.open_slot, self.length, self.step, self.evictions, self.pinned,
                  self.overflow, self.valid):
            t.zero_()
        if self._backend != "torch":
            self._ticket.zero_()
            self._obs_count.zero_()

    def set_sinks(self, sinks: Tensor) -> None:
        """The layer's learned sink logits, [num_heads] (copied; a cache built with spec.sinks)."""
        if not self.spec.sinks:
            raise ValueError("set_sinks needs a cache built with AttentionSpec(sinks=True)")
        _validate_tensor("sinks", sinks, 1)
        if sinks.shape[0] != self.Hq:
            raise ValueError(f"sinks must be [num_heads={self.Hq}], got {tuple(sinks.shape)}")
        self.sink_logits.copy_(sinks.detach().view(self.H, self.G))

    # -- prefill -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, k: Tensor, v: Tensor, mask: Tensor | None = None) -> None:
        """Store a prompt's keys/values. Not part of the compiled step (it may sync the host).

        k, v: [B, Hkv, n, D] post-RoPE. mask: bool [B, n] marking real (non-padding) tokens, or
        None for all real. Each sequence's real tokens are stored compacted, in order, as logical
        tokens 0..n_b-1 in pages 0..ceil(n_b/page_size)-1.
        """
        _validate_tensor("k", k, 4)
        _validate_tensor("v", v, 4)
        B, H, n, D = k.shape
        if (B, H, D) != (self.B, self.H, self.D) or v.shape != k.shape:
            raise ValueError(
                f"prefill k/v shape {tuple(k.shape)}/{tuple(v.shape)} do not match the cache "
                f"(batch_size={self.B}, num_kv_heads={self.H}, head_dim={self.D})"
            )
        if k.device != self.k.device or v.device != self.k.device:
            raise ValueError(f"prefill k/v on {k.device}/{v.device}, cache on {self.k.device}")
        if mask is None:
            mask = torch.ones(B, n, dtype=torch.bool, device=k.device)
        if mask.shape != (B, n) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool [{B}, {n}], got {mask.dtype} {tuple(mask.shape)}")
        if mask.device != k.device:
            raise ValueError(f"mask on {mask.device}, k on {k.device}")
        lengths = mask.sum(-1)
        n_max = int(lengths.max())
        pages_needed = -(-n_max // self.ps)
        # a bounded policy keeps a page free for decoding; a sliding-window cache that holds its whole
        # window (see window_fits) evicts its oldest page instead, and keeps the prompt's newest pages
        # only: older tokens are outside every later query's window
        room = self.P - 1 if self.policy.bounded and not self.window_fits else self.P
        first = ((lengths + self.ps - 1) // self.ps - room).clamp(min=0) if self.window_fits else 0 * lengths
        if pages_needed > room and not self.window_fits:
            what = (
                f"budget={self.config.budget} holds {self.P} pages and one must stay free for decoding"
                if self.policy.bounded
                else f"the buffer holds {self.P} pages (max_length)"
            )
            raise PromptTooLongError(f"prompt of {n_max} tokens needs {pages_needed} pages of page_size={self.ps}, "
                                     f"but {what}", n_max, prompt_slots(n_max, self.ps, self.policy.bounded))
        self.reset()
        # Real tokens to the front of each row, in order; from the row's first kept page on.
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)  # [B, n] real tokens first
        kept = min(n_max, room * self.ps)
        src = first[:, None] * self.ps + torch.arange(kept, device=k.device)[None, :]  # logical token per slot
        order = order.gather(1, src.clamp(max=n - 1))
        gather = order[:, None, :, None].expand(B, H, kept, D)
        self.k[:, :, :kept].copy_(k.gather(2, gather).to(self.k.dtype))
        self.v[:, :, :kept].copy_(v.gather(2, gather).to(self.v.dtype))
        self.length.copy_(lengths)
        pages = (lengths + self.ps - 1) // self.ps - first  # [B] pages kept
        resident = self.slot_index[None, :] < pages[:, None]  # [B, P]
        ids = torch.where(resident, self.slot_index[None, :] + first[:, None], -1)
        self.page_id.copy_(ids[:, None, :].expand(B, H, self.P))
        self.pinned.copy_(resident[:, None, :].expand(B, H, self.P) & self.policy.pin_prompt)
        self.open_slot.copy_((pages - 1).clamp(min=0)[:, None].expand(B, H))
        # Per-page key bounds over the real tokens only.
        tok = (self.slot_index[None, :, None] + first[:, None, None]) * self.ps + self._tok_ar  # [B, P, ps]
        live = resident[:, :, None] & (tok < lengths[:, None, None])  # [B, P, ps]
        kp = self.k.view(B, H, self.P, self.ps, D).float()
        live = live[:, None, :, :, None]
        inf = torch.tensor(float("inf"), device=k.device)
        kmax = torch.where(live, kp, -inf).amax(3)
        kmin = torch.where(live, kp, inf).amin(3)
        has = live.any(3)
        self.kmax.copy_(torch.where(has, kmax, 0.0).to(self.kmax.dtype))
        self.kmin.copy_(torch.where(has, kmin, 0.0).to(self.kmin.dtype))
        # the resident tokens (what a step's validity row starts from: the fused kernels rewrite only
        # the page a step changes)
        self.valid.copy_(self.token_valid().view(B * H, self.S))

    # -- decode step ---------------------------------------------------------------------------
    def decode(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One decode step: append k/v [B, Hkv, 1, D], attend with q [B, Hq, 1, D], observe q.

        Returns the attention output [B, Hq, 1, D]. No host synchronisation, fixed shapes, all
        state updated in place: safe to torch.compile(fullgraph=True) and to capture in CUDA graphs.
        :meth:`compiled_decode` compiles it the right way for the device. ``model.generate`` on a
        patched model runs exactly this, once per layer and token.
        """
        self._check_step(q, k, v)
        if self._backend == "torch":
            return self._attend_observe(q, self._prepare(q, k, v))
        state = (self.k, self.v, self.page_id, self.stamp, self.pinned, self.score, self.kmax, self.kmin,
                 self.open_slot, self.length, self.step, self.evictions, self.overflow, self.valid, self._ticket,
                 *self._lists)
        spec, sinks = self.spec, (self.sink_logits if self.spec.sinks else None)  # the layer's, for the kernels
        if self._backend == "triton" and not self.policy.narrows:
            return kernels.fused_step(q, k, v, *state, self._imp, self._obs_count, self.scale, self._refresh_pages,
                                      self.block, self.policy.step_observe, self.policy.append_code, self._recent_pages,
                                      self._threshold, self._sink_pages, spec.window or 0, spec.softcap or 0.0, sinks)
        if self.policy.fused_observe:
            kernels.fused_append_observe(q, k, v, *state, self._imp, self._sink_pages, self._recent_pages,
                                         self.block, self._refresh_pages)
            return self.attend(q)
        if self.policy.narrows:  # quest: the append with its page bounds, then the page choice (two launches)
            lists = kernels.quest_step(q, k, v, *state, self._imp, self.budget_pages)
            if self._backend == "triton":  # its picked pages through their list
                return kernels.paged_attend(q, self.k, self.v, self.page_id, self.length, *lists, self._obs_count,
                                            self.scale, self.budget_pages, spec.softcap or 0.0, sinks)
        else:
            kernels.fused_append(k, v, *state, self.policy.append_code, self._sink_pages, self._recent_pages,
                                 self.block)
            lists = None
        out = self.attend(q, lists)
        self.policy.observe(self, q, self.valid.view(self.B, self.H, self.S))
        return out

    def compiled_decode(self, **compile_kwargs):
        """:meth:`decode` compiled with ``fullgraph=True``.

        CUDA: one graph for the whole step. CPU: two graphs (append + mask, attention + observe)
        because Inductor's CPU flex template only lets mask_mod read graph inputs, not tensors
        computed or mutated in the same graph. Extra keyword arguments go to torch.compile.
        """
        if self.k.device.type != "cpu" or self._backend != "torch":
            return torch.compile(self.decode, fullgraph=True, **compile_kwargs)
        prepare = torch.compile(self._prepare, fullgraph=True, **compile_kwargs)
        attend_observe = torch.compile(self._attend_observe, fullgraph=True, **compile_kwargs)

        def decode(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self._check_step(q, k, v)
            return attend_observe(q, prepare(q, k, v))

        return decode

    def _check_step(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Shapes and devices of a step's inputs (Python checks only: no sync, nothing traced)."""
        if q.dim() != 4 or tuple(q.shape) != (self.B, self.Hq, 1, self.D):
            raise ValueError(f"q must be [batch_size={self.B}, num_heads={self.Hq}, 1, head_dim={self.D}], "
                             f"got {tuple(q.shape)}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if name != "q" and tuple(t.shape) != (self.B, self.H, 1, self.D):
                raise ValueError(f"{name} must be [batch_size={self.B}, num_kv_heads={self.H}, 1, "
                                 f"head_dim={self.D}], got {tuple(t.shape)}")
            if t.device != self.k.device:
                raise ValueError(f"{name} is on {t.device}, the cache on {self.k.device}")

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """torch backend, first half of a step: append the token, fill ``valid`` for this step; returns
        the block lists of a policy that picks pages (see :meth:`_narrow`)."""
        if self.append(k, v) and self.spec.window is None and not self.policy.narrows:
            return None  # only the new token's slot changed: append marked it valid
        return self._narrow(q)

    def _narrow(self, q: Tensor) -> tuple[Tensor, Tensor] | None:
        """After the append: ``valid`` gets the resident tokens (in the layer's window) of the pages the
        policy attends. A policy that picks pages gets flex block lists naming exactly its pages, a
        block being a page (kv_num [B*Hkv, 1, 1], kv_idx [B*Hkv, 1, 1, P], int32, all partial); else None.
        The torch backend's; quest on the fused backends makes its choice in ``kernels.quest_step``."""
        valid, choice = self.valid_slots(), self.policy.attended_pages(self, q)
        if choice is None:
            self.valid.copy_(valid.view(self.B * self.H, self.S))
            return None
        order, count = choice
        picked = torch.zeros_like(self.pinned).scatter_(
            -1, order[..., :self.budget_pages], self.slot_index[:self.budget_pages] < count[..., None])
        self.valid.copy_((valid.view(self.B, self.H, self.P, self.ps) & picked[..., None]).view(-1, self.S))
        return count.to(torch.int32).view(-1, 1, 1), order.to(torch.int32).view(-1, 1, 1, self.P)

    def _attend_observe(self, q: Tensor, lists: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """torch backend, second half of a step: attention over ``valid``, then the policy's update."""
        out = self.attend(q, lists)
        self.policy.observe(self, q, self.valid.view(self.B, self.H, self.S))
        return out

    def append(self, k: Tensor, v: Tensor) -> bool:
        """Write one token per sequence, opening a page (and evicting one) when needed: the torch rule
        (the fused kernels implement the same one). Eager on CPU, a step in which no row starts a page
        (15 of 16) skips the slot choice (the open slot, nothing opened), marks its one new slot in
        ``valid`` and returns True; otherwise False (``valid`` to be rebuilt)."""
        B, H, ps = self.B, self.H, self.ps
        self.step.add_(1)
        pos = self.length  # [B]
        off = (pos % ps)[:, None]  # [B, 1]
        if self._sdpa and not torch.compiler.is_compiling() and not bool((off == 0).any()):
            t = self._write(k, v, self.open_slot, off, opened=None, write=None)
            self.valid.view(-1).index_fill_(0, t, True)
            return True
        need = (off == 0).expand(B, H)  # a new page must be opened
        resident = self.page_id >= 0
        free = ~resident
        has_free = free.any(-1)
        first_free = free.to(torch.int8).argmax(-1)
        evictable = resident & ~self.pinned & self.policy.evictable(self)
        key = self.policy.eviction_key(self)
        top = torch.finfo(key.dtype).max if key.dtype.is_floating_point else torch.iinfo(key.dtype).max
        victim = torch.where(evictable, key, top).argmin(-1)
        can_evict = evictable.any(-1)
        ok = has_free | can_evict
        opened = need & ok
        write = ~need | ok  # False only when no slot could be found (capacity exceeded)
        self.overflow.logical_or_(~write.all())
        slot = torch.where(opened, torch.where(has_free, first_free, victim), self.open_slot)
        self.evictions.add_((opened & ~has_free).to(torch.int64))

        new = (self.slot_index == slot[..., None]) & opened[..., None]  # [B, H, P]: the page table's new entry
        new_id = (pos // ps)[:, None, None]
        self.page_id.copy_(torch.where(new, new_id, self.page_id))
        self.stamp.copy_(torch.where(new, self.step, self.stamp))
        self.pinned.copy_(self.pinned & ~new)
        self.score.copy_(torch.where(new, 0.0, self.score))
        self._write(k, v, slot, off, opened, write)
        return False

    def _write(self, k: Tensor, v: Tensor, slot: Tensor, off: Tensor, opened: Tensor | None,
               write: Tensor | None) -> Tensor:
        """The token's writes at ``slot`` [B, H], offset ``off``: K/V, the page's key bounds (reset where
        ``opened``, kept where not ``write``; None: neither), open slot, length. Returns the token's
        flat slot [B*H]. index_put_ lets Inductor write in place (a scatter_ copied the whole buffer);
        after an overflow (flagged in append, raised by check()) the token overwrites the open page's first slot."""
        D = self.D
        row = self._row0 + slot  # [B, H]: the page's row in [B*H*P, ...]
        t = (row * self.ps + off).view(-1)  # the token's row in [B*H*S, D]
        self.k.view(-1, D).index_put_((t,), k.reshape(-1, D).to(self.k.dtype))
        self.v.view(-1, D).index_put_((t,), v.reshape(-1, D).to(self.v.dtype))
        kn = k.reshape(-1, D).to(self.kmax.dtype)  # [B*H, D]: key bounds change on the written page's row only
        row = row.view(-1)
        old_max, old_min = self.kmax.view(-1, D)[row], self.kmin.view(-1, D)[row]
        new_max, new_min = torch.maximum(old_max, kn), torch.minimum(old_min, kn)
        if opened is not None:
            fresh, keep = opened.view(-1, 1), ~write.view(-1, 1)
            new_max = torch.where(fresh, kn, torch.where(keep, old_max, new_max))
            new_min = torch.where(fresh, kn, torch.where(keep, old_min, new_min))
            self.open_slot.copy_(torch.where(write, slot, self.open_slot))
        self.kmax.view(-1, D).index_put_((row,), new_max)
        self.kmin.view(-1, D).index_put_((row,), new_min)
        self.length.add_(1)
        return t

    def token_valid(self) -> Tensor:
        """bool [B, Hkv, P, page_size]: slot holds a written token of a resident page."""
        logical = self.page_id[..., None] * self.ps + self._tok_ar  # [B, H, P, ps]
        return (self.page_id[..., None] >= 0) & (logical < self.length[:, None, None, None])

    def valid_slots(self) -> Tensor:
        """bool [B, Hkv, S]: resident tokens, within the layer's window (a page-picking policy narrows
        them further in :meth:`_narrow`)."""
        valid = self.token_valid()
        if self.spec.window is not None:  # the newest `window` logical tokens, the current one included
            logical = self.page_id[..., None] * self.ps + self._tok_ar
            valid = valid & (logical >= (self.length - self.spec.window)[:, None, None, None])
        return valid.view(self.B, self.H, self.S)

    def attend(self, q: Tensor, lists: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Exact softmax attention of q [B, Hq, 1, D] over the slots marked in ``self.valid``, with the
        layer's softcap and sinks (``spec``): flex_attention with the block mask of those slots, or on
        CPU (see ``_sdpa``) the same softmax written out with them as its mask. ``lists``: the step's
        partial block lists from :meth:`_narrow` (None: the cache's own)."""
        B, H, G, S, D = self.B, self.H, self.G, self.S, self.D
        bh = B * H
        qp = q.reshape(bh, G, D).to(self.k.dtype)
        if self._sdpa and self.spec.softcap is None and not self.spec.sinks:
            # written out with bmm on 3-d views (SDPA with a boolean mask takes its math path on CPU, and
            # matmul's broadcasting adds views): a CPU step is a few dozen small ops, each one counts
            acc = torch.promote_types(self.k.dtype, torch.float32)  # fp32 softmax for 16-bit caches, fp64 kept
            logits = torch.bmm(_as(qp, acc), _as(self.k.view(bh, S, D), acc).transpose(1, 2)).mul_(self.scale)
            logits.masked_fill_(self.valid.view(bh, 1, S).logical_not(), float("-inf"))
            out = torch.bmm(_as(torch.softmax(logits, dim=-1), self.v.dtype), self.v.view(bh, S, D))
        elif self._sdpa:
            p = self._probs(qp, self.valid.view(B, H, S))  # [B, H, G, S]
            out = p.view(bh, G, S).to(self.v.dtype) @ self.v.view(bh, S, D)
        else:
            # ``valid`` and lists written by torch ops in a GPU graph get opaque copies so that Inductor's
            # flex lowering sees realized buffers (the fused backends' ``valid`` and lists are Triton outputs)
            barrier = torch.compiler.is_compiling() and self.valid.device.type != "cpu" and (
                self._backend == "torch" or self.policy.narrows)
            block_mask = build_block_mask(self.valid, self.block, G, self._lists if lists is None else lists,
                                          barrier=barrier)
            fn = _compiled_flex() if self._compile_flex and not torch.compiler.is_compiling() else flex_attention
            out = fn(qp.view(bh, 1, G, D), self.k.view(bh, 1, S, D), self.v.view(bh, 1, S, D), block_mask=block_mask,
                     scale=self.scale, kernel_options=self._kernel_options, score_mod=self._score_mod(),
                     return_aux=AuxRequest(lse=True) if self.spec.sinks else None)
            if self.spec.sinks:  # a sink's logit joins the denominator: out * e^lse / (e^lse + e^sink)
                out, lse = out[0], out[1].lse
                out = out * torch.sigmoid(lse - self.sink_logits.repeat(B, 1).view(bh, 1, G))[..., None].to(out.dtype)
        return _as(out.reshape(B, H * G, 1, D), q.dtype)

    def _score_mod(self):
        cap = self.spec.softcap
        if cap is None:
            return None

        def softcap(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / cap) * cap

        return softcap

    def _probs(self, q: Tensor, valid: Tensor) -> Tensor:
        """[B, Hkv, G, S] (fp32, fp64 for fp64 caches): the softmax of q (any [B*Hkv*G*D]-sized layout)
        over the ``valid`` slots [B, Hkv, S], with the layer's softcap and sinks (a sink takes its share
        of the mass, no slot)."""
        acc = torch.promote_types(self.k.dtype, torch.float32)
        qg = q.reshape(self.B, self.H, self.G, self.D).to(acc)
        logits = (qg @ self.k.to(acc).transpose(-1, -2)) * self.scale  # [B, H, G, S]
        if self.spec.softcap is not None:
            logits = torch.tanh(logits / self.spec.softcap) * self.spec.softcap
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
        if self.spec.sinks:
            sink = self.sink_logits[None, :, :, None].expand(self.B, self.H, self.G, 1).to(acc)
            return torch.softmax(torch.cat([logits, sink], -1), dim=-1)[..., :-1]
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    # -- importance ----------------------------------------------------------------------------
    def page_bound(self, q: Tensor) -> Tensor:
        """Quest's upper bound of q.k per page, max over each KV head's query heads: fp32 [B, Hkv, P].

        sum_d max(q_d M_d, q_d m_d) = q+ . M + q- . m  (q+ = max(q, 0), q- = min(q, 0)), so it is
        two small matmuls instead of a [G, P, D] intermediate. Empty slots get -inf. The fused backends
        take the bounds kernel (many programs a row), the torch backend the code below."""
        if self._backend != "torch":
            return kernels.page_bounds(q, self.kmax, self.kmin, self.page_id)
        if not torch.compiler.is_compiling():  # eager (the CPU path): two batched products, few ops
            bh, f32 = self.B * self.H, torch.float32
            qg = _as(q.reshape(bh, self.G, self.D), f32)
            kmax = _as(self.kmax.view(bh, self.P, self.D), f32).transpose(1, 2)
            kmin = _as(self.kmin.view(bh, self.P, self.D), f32).transpose(1, 2)
            s = torch.bmm(qg.clamp(min=0), kmax).add_(torch.bmm(qg.clamp(max=0), kmin)).amax(1)
            return torch.where(self.page_id >= 0, s.view(self.B, self.H, self.P), float("-inf"))
        qg = q.reshape(self.B, self.H, self.G, 1, self.D).float()
        kmax, kmin = self.kmax.float(), self.kmin.float()
        # compiled: one reduction over D per query head, maxed: one fused pass over kmax/kmin (kernels.md)
        s = None
        for g in range(self.G):
            qi = qg[:, :, g]  # [B, H, 1, D]
            sg = (qi.clamp(min=0) * kmax + qi.clamp(max=0) * kmin).sum(-1)
            s = sg if s is None else torch.maximum(s, sg)
        return torch.where(self.page_id >= 0, s, float("-inf"))

    def page_share(self, q: Tensor, valid: Tensor) -> Tensor:
        """Share of the current query's softmax mass on each page slot, max over the KV head's
        query heads: fp32 [B, Hkv, P] (0 for pages not attended)."""
        return self._probs(q, valid).float().view(self.B, self.H, self.G, self.P, self.ps).sum(-1).amax(2)
