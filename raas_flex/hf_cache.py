"""The transformers cache of a patched model: :class:`RaaSCache`, one :class:`RaaSLayer` per decoder
layer, each owning a :class:`~raas_flex.engine.PagedKVCache` (how it fits into transformers:
:mod:`raas_flex.hf`), and the attention functions a prompt runs (the unpatched model's own).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import Tensor, nn

from .config import CONFIG_OPTIONS, AttentionSpec, PromptTooLongError, RaaSConfig, prompt_slots
from .engine import PagedKVCache
from .policies import POLICY_CLASSES, Streaming, make_policy, policy_options

try:  # transformers is an install dependency, but keep `import raas_flex` usable without it
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover
    Cache = CacheLayerMixin = object  # type: ignore[misc,assignment]

ATTN_IMPLEMENTATION = "raas_flex"
_OPTION_NAMES = ("policy",) + CONFIG_OPTIONS + tuple(sorted({o for n in POLICY_CLASSES for o in policy_options(n)}))
_RUNTIME_ATTR = "_raas_flex"
# kv_length that RaaSLayer.get_mask_sizes reports for a decode step (no real length is negative):
# raas_mask recognises it and returns None, since the engine knows which slots are valid. It is the
# same constant every step, so a compiled decode forward sees no Python value change between steps.
_DECODE_KV_LENGTH = -(2**31)


# id(model config) -> the attention implementation it had before patch (what prompts and forwards
# without a RaaSCache run, so that they match the unpatched model)
_ORIGINAL_IMPL: dict[int, str] = {}


def _original_impl(config) -> str:
    impl = _ORIGINAL_IMPL.get(id(config), "sdpa")
    return impl if impl == "eager" else "sdpa"


def _model_attention(module):
    """The attention function the unpatched model runs for ``module``: its own eager function (which
    knows its softcap and sinks) for an eager model, else SDPA."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _original_impl(getattr(module, "config", None)) == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _additive(mask, dtype):
    """A boolean attention mask as the additive float mask an eager attention function adds."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)



def _check_dense_layers(config: RaaSConfig, n: int) -> None:
    if config.dense_layers > n:
        raise ValueError(f"dense_layers={config.dense_layers} exceeds the model's {n} layers; allowed: 0..{n}")


def _override(config: RaaSConfig, options: dict) -> RaaSConfig:
    """``config`` with some options changed (RaaSCache(model, **options)): a new ``policy`` takes the
    policy options given with it; policy options alone change the current policy's."""
    options = dict(options)
    budget = options.pop("budget", config.budget)
    cache_opts = {k: options.pop(k) for k in list(options) if k in CONFIG_OPTIONS}
    policy = options.pop("policy", None)
    if policy is None:
        current = {f.name: getattr(config.policy, f.name) for f in dataclasses.fields(config.policy)}
        policy = make_policy(config.policy.name, **{**current, **options}) if options else config.policy
    else:
        policy = make_policy(policy, **options)
    return config.replace(budget=budget, policy=policy, **cache_opts)


def _runtime_of(model):
    """The runtime object raas_flex.patch attached to ``model`` (None if it is not patched)."""
    return model.__dict__.get(_RUNTIME_ATTR) if isinstance(model, nn.Module) else None



# -- cache -------------------------------------------------------------------------------------------
class RaaSLayer(CacheLayerMixin):
    """One decoder layer of a :class:`RaaSCache`: its ``PagedKVCache`` engine and logical length.

    For the prompt, ``update`` stores nothing (it returns the new keys/values unchanged) and the
    attention function stores them through the engine; for a decode step, ``update`` appends the
    token to the engine and returns the engine's K/V buffers, and the attention function finishes the
    step. ``keys``/``values`` stay ``None``: read the engine.
    """

    # the decode forward traces to one graph without recompiles (see update / raas_attention), so
    # generate auto-compiles it on CUDA; the prompt forward stays eager
    is_compileable = True
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: "RaaSCache", layer_idx: int, config: RaaSConfig) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.config = config
        self.engine: PagedKVCache | None = None
        # Logical length (padding included, what transformers' positions count) = prompt length +
        # decode steps, the latter read from the engine when asked: nothing Python-side changes
        # during decoding, so a compiled decode forward neither recompiles nor syncs the host.
        # The decode path reads only this bool (guarded as a constant by torch.compile, the same for
        # every step and every generation), never prefill_len, which varies with the prompt.
        self.prefilled = False
        self.prefill_len: int | None = None  # padded prompt length; None until the prompt ran
        self.final_len: int | None = None  # length when the engine was handed to a later generation
        self.capacity: int | None = None  # token slots per row for the O(N) policies
        self.spec = AttentionSpec()  # the model's attention semantics in this layer (read at the prompt)

    def __repr__(self) -> str:
        return f"RaaSLayer(layer={self.layer_idx}, policy={self.config.policy.name!r}, budget={self.config.budget}, seen={self.seen})"

    @property
    def seen(self) -> int:
        """Logical tokens seen, padding included (host sync)."""
        return int(self.get_seq_length())

    def release(self) -> None:
        """Called when a later generation takes this layer's engine over: freeze the length."""
        if self.prefill_len is not None and self.final_len is None:
            self.final_len = self.prefill_len + int(self.engine.step)

    # transformers' layer API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        runtime = self.cache._runtime
        if not runtime.active:
            raise RuntimeError(
                "this RaaSCache belongs to a model that was unpatched (raas_flex.unpatch); create a new cache "
                "after raas_flex.patch, or use a transformers cache with the unpatched model"
            )
        impl = runtime.model_config._attn_implementation
        if impl != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"RaaSCache needs config._attn_implementation={ATTN_IMPLEMENTATION!r} (set by raas_flex.patch), "
                f"found {impl!r}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.prefilled and key_states.shape[2] == 1 and not self.cache._prompt_pieces:
            # decode step: hand the new key to raas_attention through the engine's input buffer, which
            # identifies the engine there (the copy fuses with the key's rotary kernel); the value goes
            # as it is (the kernels read strided K/V). raas_attention runs the whole step
            # (PagedKVCache.decode)
            if not runtime.owns(self):
                raise RuntimeError(
                    f"layer {self.layer_idx}: the KV state of this RaaSCache was taken over by a later generation on "
                    "the same model (engines are reused between generations); it cannot be continued"
                )
            self._check_capacity()
            with torch.no_grad():
                self.engine.k_new.copy_(key_states.detach())
            return self.engine.k_new, value_states
        runtime.pending[self.layer_idx] = (self, key_states)
        return key_states, value_states

    def _check_capacity(self) -> None:
        """Eager steps of a cache not sized by generate (model called by hand): raise before a
        quest/dense buffer overflows. One host sync; skipped when compiled and inside generate,
        which sizes the buffer up front (overflow is still flagged by the engine, see check())."""
        if torch.compiler.is_compiling() or self.capacity is None or self.cache._sized_for_generation:
            return
        need = int(self.engine.length.max()) + 1
        if need > self.capacity:
            raise ValueError(
                f"layer {self.layer_idx}: policy={self.config.policy.name!r} keeps every token and its buffer holds "
                f"{self.capacity} tokens per sequence (max_length={self.cache.max_length}); this step needs "
                f"{need}. Pass a larger max_length (RaaSCache(model, max_length=...) or the max_length "
                "option), or generate fewer tokens"
            )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.prefilled and query_length == 1 and not self.cache._prompt_pieces:
            return _DECODE_KV_LENGTH, 0  # a decode step: raas_mask returns None for it
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self):
        """Logical length (padding included). An int (host sync on the engine's step counter), or
        a 0-dim tensor while torch.compile traces, so that positions derived from it never sync."""
        if self.prefill_len is None:
            return 0
        if self.final_len is not None:
            return self.final_len
        if torch.compiler.is_compiling():
            return self.engine.step + self.prefill_len
        return self.prefill_len + int(self.engine.step)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.engine = None
        self.prefilled = False
        self.prefill_len = self.final_len = None
        self.capacity = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("RaaSCache cannot be cropped: evicted pages cannot be restored")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("RaaSCache does not support beam search (reorder_cache); use num_beams=1")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.prefilled:
            raise NotImplementedError("RaaSCache cannot repeat a filled cache along the batch")

    def batch_select_indices(self, indices) -> None:
        if self.prefilled:
            raise NotImplementedError("RaaSCache cannot select batch rows of a filled cache")

    def offload(self) -> None:
        return None

    def prefetch(self) -> None:
        return None

    # the work, called by raas_attention
    def attend(self, module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
        """The prompt forward (decode steps go through update and raas_attention instead)."""
        if not self.prefilled:
            return self._prefill(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        n = query.shape[2]
        if self.final_len is None and self.cache._runtime.owns(self) and int(self.engine.step) == 0:
            # a further prompt piece before any decode step: generate's chunked prefill
            return self._extend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        raise NotImplementedError(
            f"RaaSCache decodes one token per row per forward after the prompt; got {n} new tokens for a cache "
            f"holding {self.seen}. Use a new RaaSCache (or none: generate creates one) for each generate call"
        )

    def _prefill(self, module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
        B, Hq, n, D = query.shape
        Hkv = key.shape[1]
        out, weights = _model_attention(module)(module, query, key, value, attention_mask, dropout=dropout,
                                                scaling=scaling, **kwargs)
        real = _real_tokens(attention_mask, B, n, key.device)
        scale = float(scaling) if scaling is not None else D**-0.5
        sinks = kwargs.get("s_aux")
        self.spec = AttentionSpec(window=kwargs.get("sliding_window") or None, softcap=kwargs.get("softcap"),
                                  sinks=sinks is not None)
        cfg = _layer_config(self.config, self.spec)
        max_length = None
        if not cfg.policy.bounded:
            max_length = self.cache.max_length
            if max_length is None:
                raise ValueError(
                    f"policy={cfg.policy.name!r} (layer {self.layer_idx}) keeps every token and needs max_length, the most "
                    "tokens a sequence will hold: generate fills it in; when calling the model yourself pass "
                    "RaaSCache(model, max_length=...)"
                )
        slots = cfg.slots(max_length)
        pool_key = (cfg, self.spec, B, Hq, Hkv, D, key.dtype, key.device, scale, slots)

        def make() -> PagedKVCache:
            return PagedKVCache(
                cfg, batch_size=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, dtype=key.dtype,
                device=key.device, scale=scale, max_length=max_length, spec=self.spec,
            )

        engine = self.cache._runtime.engine(self, pool_key, make)
        if sinks is not None:
            engine.set_sinks(sinks)
        # padding positions never get attended; zero them so no non-finite value enters the buffer
        keep = real[:, None, :, None]
        try:
            engine.prefill(torch.where(keep, key, 0), torch.where(keep, value, 0), real)
        except ValueError as e:
            raise ValueError(f"layer {self.layer_idx}, policy={cfg.policy.name!r}: {self._whole_prompt(e)}") from None
        if self.cache._runtime.tracer is not None:
            self.cache._runtime.tracer.on_prefill(self.layer_idx, engine)
        self.engine = engine
        self.capacity = None if cfg.policy.bounded else engine.S
        self.prefill_len = n
        self.final_len = None
        self.prefilled = True
        self.cache._runtime.last_cache = self.cache
        return out, weights


    def _whole_prompt(self, e: ValueError) -> str:
        """The engine's prompt-too-long message, sized for the whole prompt when generate told the cache
        its length (a prompt in pieces is refused at the piece that overflows, before the rest is read)."""
        total = self.cache._prompt_tokens
        if not isinstance(e, PromptTooLongError) or total is None or total <= e.tokens:
            return str(e)
        need = prompt_slots(total, self.config.page_size, self.config.policy.bounded)
        what = "budget" if self.config.policy.bounded else "max_length"
        return f"{e.reason}; the whole prompt holds {total} tokens: use {what} >= {need}"

    def _extend(self, module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
        """A further piece of the prompt (generate's ``prefill_chunk_size``): its queries attend the
        prompt tokens already stored in the engine (the real ones, compacted) and the piece itself
        under the piece's part of the model's mask; then the engine holds the whole prompt so far,
        as if it had come in one forward."""
        eng = self.engine
        B, _, n, _ = query.shape
        # the stored prompt in logical order (a sliding-window cache may hold only its newest pages)
        logical = (eng.page_id[:, 0, :, None] * eng.page_size + torch.arange(eng.page_size, device=key.device)
                   ).view(B, eng.S)
        stored = eng.token_valid()[:, 0].reshape(B, eng.S)
        order = torch.argsort(torch.where(stored, logical, torch.iinfo(logical.dtype).max), dim=-1, stable=True)
        n_prev = int(stored.sum(-1).max())
        order = order[:, :n_prev]
        prev_real = stored.gather(1, order)  # [B, n_prev]
        prev_pos = logical.gather(1, order)
        gather = order[:, None, :, None].expand(B, eng.H, n_prev, eng.D)
        k_all = torch.cat([eng.k.gather(2, gather).to(key.dtype), key], dim=2)
        v_all = torch.cat([eng.v.gather(2, gather).to(value.dtype), value], dim=2)
        piece_real = _real_tokens(attention_mask, B, n, key.device)
        prev = prev_real[:, None, :].expand(B, n, n_prev)
        if self.spec.window is not None:  # the window over the stored part, in logical positions
            q_pos = eng.length[:, None] + piece_real.long().cumsum(-1) - 1  # [B, n]
            prev = prev & (prev_pos[:, None, :] > q_pos[:, :, None] - self.spec.window)
        mask = torch.cat([prev[:, None], _piece_mask(attention_mask, B, n, key.device)], dim=-1)
        attn = _model_attention(module)
        out, weights = attn(module, query, k_all, v_all, mask if _original_impl(module.config) == "sdpa"
                            else _additive(mask, query.dtype), dropout=dropout, scaling=scaling, **kwargs)
        real = torch.cat([prev_real, piece_real], dim=1)
        keep = real[:, None, :, None]
        try:
            with torch.no_grad():
                eng.prefill(torch.where(keep, k_all, 0).detach(), torch.where(keep, v_all, 0).detach(), real)
        except ValueError as e:
            raise ValueError(f"layer {self.layer_idx}, policy={self.config.policy.name!r} (prompt in pieces, "
                             f"{self.prefill_len} + {n} tokens so far): {self._whole_prompt(e)}") from None
        if self.cache._runtime.tracer is not None:
            self.cache._runtime.tracer.on_prefill(self.layer_idx, eng, extend=True)
        self.prefill_len += n
        return out, weights


def _layer_config(config: RaaSConfig, spec: AttentionSpec) -> RaaSConfig:
    """The configuration of one layer's cache. A sliding-window layer whose window fits the budget (or
    whose policy keeps every token) gets a ring of the window's pages plus one, evicting the oldest
    page: exactly the model's attention in O(window) memory. A larger window keeps the policy, with
    the window applied to the resident tokens."""
    if spec.window is None:
        return config
    ring = (-(-spec.window // config.page_size) + 1) * config.page_size
    if config.policy.bounded and ring > config.budget:
        return config
    return config.replace(budget=max(ring, 2 * config.page_size), policy=Streaming(sink_tokens=0))


def _piece_mask(mask, batch: int, n: int, device) -> Tensor:
    """bool [B, 1, n, n]: which keys of a prompt piece each of its queries attends, from the mask the
    model passes to attention (its last n key columns; None or a 2D padding mask: causal, and for a 2D
    mask only real keys, every query keeping at least its own position)."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if mask is None:
        return causal.expand(batch, 1, n, n)
    if mask.dim() == 4:
        part = mask[:, :, -n:, -n:]
        if part.dtype != torch.bool:
            part = part > torch.finfo(part.dtype).min / 2
        return part.to(device).expand(batch, 1, n, n)
    if mask.dim() == 2:
        keys = mask[:, -n:].bool().to(device)
        eye = torch.eye(n, dtype=torch.bool, device=device)
        return ((causal & keys[:, None, :]) | eye)[:, None]
    raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")


def _real_tokens(mask, batch: int, n: int, device) -> Tensor:
    """bool [B, n]: real (non-padding) prompt tokens, from the mask the model passes to attention."""
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if mask.dim() == 4:
        # the last query row sees every key causally, so it marks exactly the real keys
        row = mask[:, 0, -1, -n:]
        if row.dtype != torch.bool:
            row = row > torch.finfo(row.dtype).min / 2
    elif mask.dim() == 2:
        row = mask[:, -n:].bool()
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    return row.to(device).expand(batch, n)


class RaaSCache(Cache):
    """``transformers`` cache for a model patched by :func:`patch` (one :class:`RaaSLayer` per layer).

    ``generate`` creates one for you; pass one explicitly (``past_key_values=RaaSCache(model)``) to
    keep it, inspect it (:func:`stats` accepts a cache) or override options for one call:
    ``RaaSCache(model, max_length=..., **options)`` with the options of :func:`patch` (budget
    included). ``max_length`` (tokens per sequence, for quest/dense and ``dense_layers``) defaults to
    the ``max_length`` option, else to what ``generate`` needs. Use a new cache per ``generate``.
    """

    def __init__(self, model: nn.Module, *, max_length: int | None = None, **options) -> None:
        runtime = _runtime_of(model)
        if runtime is None or not runtime.active:
            raise ValueError("RaaSCache needs a model patched by raas_flex.patch(model, budget=...)")
        config = runtime.config
        if options:
            for name in options:
                if name != "budget" and name not in _OPTION_NAMES:
                    raise TypeError(
                        f"RaaSCache got an unknown option {name!r}; allowed: max_length, budget, {', '.join(_OPTION_NAMES)}"
                    )
            config = _override(config, options)
            _check_dense_layers(config, runtime.num_layers)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        self._runtime = runtime
        self.config = config
        self.fixed_max_length = max_length if max_length is not None else config.max_length
        self.max_length = self.fixed_max_length
        self._sized_for_generation = False  # set by prepare_generation while generate runs
        # True while generate hands the prompt over in pieces (prefill_chunk_size): then a 1-token
        # forward is the prompt's last piece, not a decode step (a constant False while decoding)
        self._prompt_pieces = False
        self._prompt_tokens: int | None = None  # real tokens of the longest prompt row, set by generate
        layers = [RaaSLayer(self, i, runtime.layer_config(config, i)) for i in range(runtime.num_layers)]
        super().__init__(layers=layers)

    @property
    def needs_max_length(self) -> bool:
        return any(not layer.config.policy.bounded for layer in self.layers)

    def prepare_generation(self, max_cache_length: int) -> None:
        """Called by the patched ``generate``: size the O(N) buffers for ``max_cache_length`` tokens
        per sequence (prompt with padding + new tokens - 1), or check that a fixed max_length fits."""
        if not self.needs_max_length:
            return
        self._sized_for_generation = False
        if self.fixed_max_length is None:
            self.max_length = max_cache_length
        elif max_cache_length > self.fixed_max_length:
            policies = sorted({layer.config.policy.name for layer in self.layers if not layer.config.policy.bounded})
            raise ValueError(
                f"this generation can hold up to {max_cache_length} tokens per sequence (prompt + max_new_tokens - 1) "
                f"but max_length={self.fixed_max_length} (policies {policies} keep every token); raise max_length "
                "or lower max_new_tokens"
            )
        self._sized_for_generation = True  # every step of this generation fits: no per-step check

    def get_query_offset(self, layer_idx: int = 0):
        # After the prompt only single-token decode steps run, and their mask is skipped (see
        # RaaSLayer.get_mask_sizes), so the offset matters only for a further prompt piece (chunked
        # prefill, eager), which starts where the prompt so far ends. A constant while compiled, and
        # never a host sync, so that a decode step neither recompiles nor syncs.
        if layer_idx < len(self.layers) and self.layers[layer_idx].prefilled:
            layer = self.layers[layer_idx]
            if torch.compiler.is_compiling() or layer.final_len is not None:
                return 0
            return layer.prefill_len
        return super().get_query_offset(layer_idx)

    def engines(self) -> list[PagedKVCache | None]:
        return [layer.engine for layer in self.layers]

    def check(self) -> None:
        """Raise if any layer's buffer overflowed (host sync)."""
        for layer in self.layers:
            if layer.engine is not None and self._runtime.owns(layer):
                try:
                    layer.engine.check()
                except RuntimeError as e:
                    raise RuntimeError(f"layer {layer.layer_idx}: {e}") from None

