"""Hugging Face ``transformers`` integration: ``patch``, ``unpatch``, ``patched``, ``stats``, ``RaaSCache``.

    model = raas_flex.patch(model, budget=1024)   # any SUPPORTED_MODEL_TYPES model, in place
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32_000)
    raas_flex.stats(model)                         # per layer: policy, budget, resident tokens, KV bytes
    raas_flex.unpatch(model)                       # back to exactly the original model

How it fits into transformers (5.17 and later):

- ``patch`` registers one attention function and one mask function under the name
  ``"raas_flex"`` (``AttentionInterface`` / ``AttentionMaskInterface``; nothing is registered at
  import time), lets ``generate`` check for the end of a RaaS generation one step late on CUDA
  (``_deferred_stop_check``: no host sync per token), and sets
  ``config._attn_implementation = "raas_flex"`` on the model's config. It attaches a small runtime
  object (plain Python, not an ``nn.Module``: ``state_dict`` and ``modules()`` are unchanged) to the
  model and to each attention module, and wraps three methods on
  the model *instance* (never the class): ``_prepare_cache_for_generation`` (so that ``generate``
  creates a :class:`RaaSCache` when no cache is passed and ``cache_implementation`` is unset),
  ``generate`` (to raise if any layer's cache overflowed during the generation) and ``_prefill``
  (so that a prompt in pieces, ``prefill_chunk_size``, runs eagerly).
- A :class:`RaaSCache` is a ``transformers`` ``Cache`` with one :class:`RaaSLayer` per decoder
  layer. For the prompt, ``Cache.update`` stores nothing: it hands the layer over to the runtime and
  returns the new keys/values unchanged; the attention function, called right after by the same
  attention module, takes that layer from the runtime (by ``module.layer_idx``; it checks it
  received the very key tensor ``update`` returned) and runs the prefill (the unpatched model's own
  attention over the prompt with its mask, then ``PagedKVCache.prefill`` with the real-token mask:
  left padding is compacted away). The layer's cache is built then, for what the model passes its
  attention function: a sliding window, a softcap, sinks (``AttentionSpec``, :mod:`raas_flex.hf_cache`). A further prompt piece (``prefill_chunk_size``) attends the stored real
  tokens plus itself, and the engine is filled again with the prompt so far. For a decode step,
  ``update`` copies the new key into the engine's input buffer and returns it with the value; the
  attention function recognises it (``key is engine.k_new``) and runs the whole step,
  ``PagedKVCache.decode`` (append, attention, observe): the path the one-layer benchmark times.
- Decode steps change no Python state (``RaaSLayer.is_compileable`` is True): the decode forward
  traces to one graph that replays for every step, so ``generate`` auto-compiles it on CUDA (the
  prompt stays eager). ``get_seq_length`` is the logical (padded) length that positions need: prompt
  length + the engine's step counter (a host sync when asked, a tensor while compiling); decode-time
  ``get_mask_sizes``/``get_query_offset`` return constants (``get_query_offset`` is the prompt
  length when eager, which only a further prompt piece's mask uses).
- The mask function returns the unpatched model's mask (SDPA's, or eager's for an eager model) for
  the prompt and ``None`` for RaaS decode steps (the engine knows which slots are valid;
  ``get_mask_sizes`` reports a sentinel kv_length for them). Forwards that do not use a ``RaaSCache``
  (``use_cache=False``, ``cache_implementation=...``, a cache of another type, which warns once) run
  the unpatched model's attention.
- The per-layer engines (``PagedKVCache``) live in the runtime and are reused by later generations
  whose shapes (batch, heads, dtype, device, buffer length, options) match, so repeated ``generate``
  calls reuse the same buffers. A cache whose engines were taken over by a later generation raises
  if it is used again.

Supported: ``model_type`` in ``SUPPORTED_MODEL_TYPES``, full and sliding-window layers. Greedy and
sampled decoding, left-padded batches, EOS stopping. Not supported: beam search (``reorder_cache``),
continuing a filled cache with several tokens at once, assisted decoding.

A family joins ``SUPPORTED_MODEL_TYPES`` when its attention module hands the attention function only
what ``RaaSLayer._prefill`` reads (``scaling``, ``sliding_window``, ``softcap``, ``s_aux``) or what does
not change the attention (``position_ids``, ``use_cache``, router flags), every layer has its own K/V
(no shared or latent KV), ``tests/test_families.py`` passes for it (it tests every supported type;
a MoE family needs its small sizes in ``tiny_model``) and the README's table names it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .config import SUPPORTED_HEAD_DIMS, RaaSConfig, make_config
from .engine import PagedKVCache
from .hf_cache import (_DECODE_KV_LENGTH, _OPTION_NAMES, _RUNTIME_ATTR, _ORIGINAL_IMPL, ATTN_IMPLEMENTATION,
                       RaaSCache, RaaSLayer, _check_dense_layers, _model_attention, _original_impl,
                       _runtime_of)
from .policies import Dense

try:  # transformers is an install dependency, but keep `import raas_flex` usable without it
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover
    Cache = CacheLayerMixin = object  # type: ignore[misc,assignment]

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SUPPORTED_MODEL_TYPES",
    "RaaSCache",
    "RaaSLayer",
    "patch",
    "patched",
    "stats",
    "unpatch",
]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "qwen3_moe", "phi3", "olmo2", "olmo3",
                         "smollm3", "granite", "gemma2", "gemma3_text", "gpt_oss", "seed_oss", "glm4", "glm4_moe",
                         "exaone4", "exaone_moe", "hunyuan_v1_dense", "hunyuan_v1_moe", "ernie4_5", "ernie4_5_moe",
                         "minimax_m2", "cohere2", "ministral3")
_WRAPPED_METHODS = ("_prepare_cache_for_generation", "generate", "_prefill")

# Models currently patched (registrations are removed when the last one is unpatched) and what the
# registered names held before patch() registered them (normally nothing).
_PATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_SAVED_REGISTRATIONS: dict[str, object] | None = None
_MISSING = object()


# -- registration ----------------------------------------------------------------------------------
def _interfaces():
    """What patch registers into: transformers' attention and mask registries and the generation
    module whose ``DeferredStopCheck`` it extends."""
    import transformers.generation.utils as generation
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    return AttentionInterface, AttentionMaskInterface, generation


def _deferred_stop_check(base: type) -> type:
    """``generate``'s one-step-late stopping check (transformers' ``DeferredStopCheck``), also taken
    for a RaaS generation on CUDA.

    ``generate`` reads "has every row finished?" on the host after each token, a host sync that
    leaves the GPU idle while the host prepares the next step (measured in docs/performance.md).
    Transformers can read that flag one step late instead (copied asynchronously), at the
    cost of one extra decode step when an end-of-sequence token stops the loop, whose token is
    dropped; it takes that path on MPS only. A RaaS generation takes it on CUDA as well when the
    cache is not handed back to the caller (no ``return_dict_in_generate``, no cache passed in): the
    extra step may have evicted a page, which cannot be undone, but the cache is then discarded
    (``raas_flex.stats`` after such a call counts that step). Every other cache keeps transformers'
    own decision."""

    class RaaSDeferredStopCheck(base):
        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant):
            if isinstance(cache, RaaSCache) and device.type == "cuda":
                return not cache_is_returned and not is_assistant
            return base.is_supported(device, cache, cache_is_returned, is_assistant)

    return RaaSDeferredStopCheck


def _register() -> None:
    global _SAVED_REGISTRATIONS
    if _SAVED_REGISTRATIONS is not None:
        return
    attn, mask, generation = _interfaces()
    _SAVED_REGISTRATIONS = {
        "attn": attn._global_mapping.get(ATTN_IMPLEMENTATION, _MISSING),
        "mask": mask._global_mapping.get(ATTN_IMPLEMENTATION, _MISSING),
        "stop": generation.DeferredStopCheck,
    }
    attn.register(ATTN_IMPLEMENTATION, raas_attention)
    mask.register(ATTN_IMPLEMENTATION, raas_mask)
    generation.DeferredStopCheck = _deferred_stop_check(generation.DeferredStopCheck)


def _unregister() -> None:
    global _SAVED_REGISTRATIONS
    if _SAVED_REGISTRATIONS is None:
        return
    attn, mask, generation = _interfaces()
    for cls, key in ((attn, "attn"), (mask, "mask")):
        old = _SAVED_REGISTRATIONS[key]
        if old is _MISSING:
            cls._global_mapping.pop(ATTN_IMPLEMENTATION, None)
        else:
            cls._global_mapping[ATTN_IMPLEMENTATION] = old
    generation.DeferredStopCheck = _SAVED_REGISTRATIONS["stop"]
    _SAVED_REGISTRATIONS = None



def raas_mask(*args, **kwargs):
    """Mask function registered under ``"raas_flex"``: SDPA's mask, except ``None`` for a RaaS
    decode step (recognised by the sentinel kv_length that :meth:`RaaSLayer.get_mask_sizes` returns)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    kv_length = kwargs["kv_length"] if "kv_length" in kwargs else (args[2] if len(args) > 2 else None)
    if isinstance(kv_length, int) and kv_length == _DECODE_KV_LENGTH:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[_original_impl(kwargs.get("config"))](*args, **kwargs)


def raas_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered under ``"raas_flex"``.

    query [B, Hq, q, D], key/value [B, Hkv, q, D] (post-RoPE, not repeated for GQA). With a
    :class:`RaaSCache` in use: for a decode step ``RaaSCache.update`` has copied the new K/V into the
    engine's input buffers and returned those, which identify the engine here (no Python state
    changes, so a compiled decode forward replays without recompiling), and the whole step runs
    (``PagedKVCache.decode``); for the prompt, the layer handed over by ``update`` runs the prefill.
    Otherwise this is the unpatched model's attention.
    """
    runtime = module.__dict__.get(_RUNTIME_ATTR)
    layer_idx = getattr(module, "layer_idx", None)
    engine = runtime.decode_engine(layer_idx, key) if runtime is not None else None
    if engine is not None:
        # the decode step (inference only: views of tensors that require grad keep requires_grad even
        # under no_grad, hence detach). Eager, it runs in inference mode, which dispatches the step's
        # many small ops faster (about 15% on CPU); its output is cloned out of it for the model.
        eager = not torch.compiler.is_compiling()
        with torch.inference_mode() if eager else torch.no_grad():
            q = query.detach()
            out = engine.decode(q, engine.k_new, value.detach())  # [B, Hq, 1, D]
            if runtime.tracer is not None:  # raas_flex.tracing block open (off: no op is added to the step)
                runtime.tracer.on_decode(layer_idx, engine, q)
        return (out.clone() if eager else out).transpose(1, 2), None
    layer = runtime.take(layer_idx, key) if runtime is not None else None
    if layer is None:
        return _model_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
    return layer.attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


# -- model checks and options ----------------------------------------------------------------------
def _supported_text() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES) + " (decoder-only; full and sliding-window attention layers)"


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"raas_flex.patch expects a transformers causal LM (nn.Module with a .config), got {type(model).__name__}"
        )
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(
            f"model_type={mt!r} is an encoder-decoder model, which raas_flex does not support; supported: {_supported_text()}"
        )
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={mt!r} is not supported by raas_flex; supported: {_supported_text()}")
    layer_types = getattr(cfg, "layer_types", None) or ()
    other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if other:
        raise ValueError(f"model_type={mt!r} has layers of type {other}, which raas_flex does not support; supported: "
                         "full_attention and sliding_attention layers")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"model_type={mt!r} has head_dim={head_dim}, not supported; allowed: {SUPPORTED_HEAD_DIMS}")
    _check_tensor_parallel(model)


# projections whose colwise sharding splits the attention heads across tensor-parallel ranks (styles
# "colwise", "unit_colwise", "packed_colwise"; "colwise_gather_output"/"colwise_rep", as in phi3 and
# olmo2/3, gather the output: every rank then holds all heads)
_TP_HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value")


def _check_tensor_parallel(model) -> None:
    """A model loaded with transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` or
    ``distributed_config=DistributedConfig(tp_size=N)``) runs each rank's attention on its local heads,
    Hq/N query and Hkv/N KV heads, and each rank's engine keeps the page table of its own KV heads (no
    collective in the decode step). That needs whole heads per rank and each KV head's query group on
    the same rank: N must divide both head counts."""
    tp = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None) or 1
    if tp <= 1:
        return
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    if not any(key.rsplit(".", 1)[-1] in _TP_HEAD_PROJECTIONS and str(style).endswith("colwise")
               for key, style in plan.items()):
        return  # the attention heads are not sharded: every rank holds all of them
    cfg = model.config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    if hq % tp or hkv % tp:
        g = math.gcd(hq, hkv)
        raise ValueError(
            f"model_type={cfg.model_type!r} is tensor-parallel over {tp} ranks, but its {hq} query / {hkv} KV heads do "
            f"not shard evenly: raas_flex keeps each rank's page table per local KV head, so the tensor-parallel size "
            f"must divide both head counts; allowed: {[d for d in range(1, g + 1) if g % d == 0]}"
        )


def _make_config(model, budget, options: dict) -> RaaSConfig:
    for name in options:
        if name not in _OPTION_NAMES:
            raise TypeError(f"raas_flex.patch got an unknown option {name!r}; allowed: budget, {', '.join(_OPTION_NAMES)}")
    config = make_config(budget, **options)
    _check_dense_layers(config, model.config.num_hidden_layers)
    return config



# -- runtime -----------------------------------------------------------------------------------------
class _Runtime:
    """Per patched model: the RaaS options, the engine pool and the hand-over from update() to the
    attention function. A plain object so that it never becomes a submodule of the model."""

    def __init__(self, model: nn.Module, config: RaaSConfig) -> None:
        self.model_ref = weakref.ref(model)
        self.model_config = model.config
        self.num_layers = model.config.num_hidden_layers
        self.active = True
        self.pending: dict[int, tuple[RaaSLayer, Tensor]] = {}
        # layer_idx -> (shape/options key, engine, owning RaaSCache or None)
        self.pool: dict[int, tuple[tuple, PagedKVCache, object]] = {}
        self.last_cache: RaaSCache | None = None
        self.generation_cache: RaaSCache | None = None
        self.saved_attn: list[tuple[object, object]] = []
        self.saved_methods: dict[str, object] = {}
        self.attn_modules: list[nn.Module] = []
        self.tracer = None  # raas_flex.trace.AttentionTrace while a raas_flex.tracing block is open
        self.warned_foreign_cache = False  # generate was given a cache of another type (warned once)
        self.configure(config)

    def configure(self, config: RaaSConfig) -> None:
        self.config = config
        self.pool.clear()
        self.pending.clear()
        self.last_cache = None

    def layer_config(self, config: RaaSConfig, layer_idx: int) -> RaaSConfig:
        if layer_idx < config.dense_layers:
            return config.replace(policy=Dense(), backend="torch" if config.backend == "torch" else None)
        return config

    def decode_engine(self, layer_idx, key: Tensor) -> PagedKVCache | None:
        """The engine whose K buffer ``key`` is: RaaSLayer.update returns it for a decode step."""
        entry = self.pool.get(layer_idx)
        if entry is None or entry[1].k_new is not key:
            return None
        return entry[1]

    def take(self, layer_idx, key: Tensor) -> "RaaSLayer | None":
        entry = self.pending.pop(layer_idx, None)
        if entry is None or entry[1] is not key:
            return None
        return entry[0]

    def engine(self, layer: "RaaSLayer", key: tuple, make) -> PagedKVCache:
        old = self.pool.get(layer.layer_idx)
        if old is not None and old[2] is not None and old[2] is not layer.cache:
            old[2].layers[layer.layer_idx].release()  # the old cache keeps its length, not the engine's state
        if old is not None and old[0] == key:
            eng = old[1]
        else:
            self.pool.pop(layer.layer_idx, None)  # free the old buffers before allocating new ones
            eng = make()
        self.pool[layer.layer_idx] = (key, eng, layer.cache)
        return eng

    def owns(self, layer: "RaaSLayer") -> bool:
        entry = self.pool.get(layer.layer_idx)
        return entry is not None and entry[1] is layer.engine and entry[2] is layer.cache



# -- generate hooks ------------------------------------------------------------------------------------
def generate_cache_key(model: nn.Module) -> str:
    """The name under which ``generate`` keeps the cache in its model kwargs: ``"cache"`` from
    transformers 5.24 on (``past_key_values`` there is a deprecated alias renamed on the way in),
    ``"past_key_values"`` before. Read from the model's forward signature."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _make_prepare_cache(model: nn.Module, runtime: _Runtime, original):
    model_ref = weakref.ref(model)
    sig = inspect.signature(original(model))
    key = generate_cache_key(model)

    @functools.wraps(getattr(type(model), "_prepare_cache_for_generation"))
    def _prepare_cache_for_generation(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        gen_config = bound.arguments["generation_config"]
        model_kwargs = bound.arguments["model_kwargs"]
        max_cache_length = bound.arguments["max_cache_length"]
        user_cache = model_kwargs.get(key)
        uses_raas = isinstance(user_cache, RaaSCache) or (
            user_cache is None and gen_config.use_cache is not False and gen_config.cache_implementation is None
        )
        if uses_raas and (gen_config.num_beams or 1) > 1:
            raise NotImplementedError(
                f"RaaSCache does not support beam search (num_beams={gen_config.num_beams}); use num_beams=1, or "
                "pass cache_implementation='dynamic' to decode this call densely"
            )
        if isinstance(user_cache, RaaSCache):
            result = original(model_ref())(*args, **kwargs)
            user_cache.prepare_generation(max_cache_length)
            runtime.generation_cache = user_cache
            return result
        if user_cache is not None and not runtime.warned_foreign_cache:
            runtime.warned_foreign_cache = True
            warnings.warn(
                f"generate got {key}={type(user_cache).__name__}(...) on a model patched by raas_flex: this call "
                "decodes densely, without RaaS, and raas_flex.stats() will not describe it. Pass no cache (generate "
                "then creates a RaaSCache) or raas_flex.RaaSCache(model). (Said once per patched model.)",
                UserWarning, stacklevel=3)
        if uses_raas:
            cache = RaaSCache(model_ref())
            cache.prepare_generation(max_cache_length)
            model_kwargs[key] = cache
            runtime.generation_cache = cache
            return None
        return original(model_ref())(*args, **kwargs)

    return _prepare_cache_for_generation


def _make_generate(model: nn.Module, runtime: _Runtime, original):
    model_ref = weakref.ref(model)

    @functools.wraps(getattr(type(model), "generate"))
    def generate(*args, **kwargs):
        runtime.generation_cache = None
        if runtime.tracer is not None:  # tracing copies to the host every step: decode eagerly
            if kwargs.get("disable_compile", True) is not True:
                raise ValueError("disable_compile=False cannot be used inside raas_flex.tracing (tracing runs eager)")
            kwargs["disable_compile"] = True
        try:
            out = original(model_ref())(*args, **kwargs)
        finally:
            cache, runtime.generation_cache = runtime.generation_cache, None
            if cache is not None:
                cache._sized_for_generation = False  # later steps by hand are checked again
        if cache is not None:
            cache.check()
        return out

    return generate


def _make_prefill(model: nn.Module, runtime: _Runtime, original):
    """generate's prompt stage. With ``prefill_chunk_size``, transformers runs the prompt pieces
    through the auto-compiled forward; a RaaSCache takes its prompt eagerly (the engines are made and
    filled there, with host syncs), as the one-forward prompt already runs. So for a RaaS generation
    the pieces run with ``disable_compile`` set on a copy of the generation config; the decode
    forward, chosen before the prompt stage, stays compiled. While the pieces run, the cache knows
    it, so that a last piece of one token is taken as prompt (pinned), not as a decode step."""
    model_ref = weakref.ref(model)
    sig = inspect.signature(original(model))

    @functools.wraps(getattr(type(model), "_prefill"))
    def _prefill(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        gen_config = bound.arguments["generation_config"]
        cache = runtime.generation_cache
        if cache is not None:  # so that a prompt-too-long error sizes the budget for the whole prompt
            mask = bound.arguments["model_kwargs"].get("attention_mask")
            ids = bound.arguments["input_ids"]
            cache._prompt_tokens = int(mask.sum(-1).max()) if mask is not None else ids.shape[-1]
        if cache is None or getattr(gen_config, "prefill_chunk_size", None) is None:
            return original(model_ref())(*bound.args, **bound.kwargs)
        if not gen_config.disable_compile:
            eager = copy.copy(gen_config)
            eager.disable_compile = True
            bound.arguments["generation_config"] = eager
        cache._prompt_pieces = True  # (a last piece of one token is still the prompt)
        try:
            return original(model_ref())(*bound.args, **bound.kwargs)
        finally:
            cache._prompt_pieces = False

    return _prefill


def _original_method(model: nn.Module, name: str):
    """(getter model -> bound callable, what to restore on unpatch). The getter takes the model so
    that the wrapper stored on the instance holds no strong reference to it."""
    inst = model.__dict__.get(name, _MISSING)
    if inst is not _MISSING:
        return (lambda m: inst), inst
    func = getattr(type(model), name)
    return (lambda m: func.__get__(m, type(m))), _MISSING


# -- public API ------------------------------------------------------------------------------------------
def patch(model: nn.Module, budget: int, **options) -> nn.Module:
    """Make ``model`` decode with RaaS (or another policy) at a KV budget of ``budget`` tokens; in place.

    ``options`` are :class:`RaaSConfig` fields: ``policy`` ("raas", "quest", "h2o", "streaming",
    "dense"), ``page_size``, ``refresh``, ``refresh_ratio``, ``refresh_threshold``, ``importance``,
    ``pin_prompt``, ``sink_tokens``, ``dense_layers`` (the first k layers keep every token),
    ``max_length`` (fixes the quest/dense buffer size; by default ``generate`` sizes it),
    ``block_size``, ``compile_flex``. Bad values raise ``ValueError``/``TypeError``; unsupported
    models (see ``SUPPORTED_MODEL_TYPES``; MLA and encoder-decoder models, among others) raise
    ``ValueError``.

    After it, ``model.generate(...)`` decodes with RaaS: the cache is created for you (unless you pass
    a cache or ``cache_implementation``). The prompt runs dense (SDPA), then is stored in pages.

    Patching an already patched model **reconfigures** it in place: the new options replace the old
    ones (engines are rebuilt on the next generation), nothing is wrapped twice, and a single
    :func:`unpatch` still restores the original model. Returns ``model``.
    """
    _check_model(model)
    config = _make_config(model, budget, options)
    runtime = _runtime_of(model)
    if runtime is not None:
        runtime.configure(config)
        return model

    attn_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    idx = sorted(m.layer_idx for m in attn_modules)
    if idx != list(range(model.config.num_hidden_layers)):
        raise ValueError(
            f"model_type={model.config.model_type!r}: expected one attention module per layer "
            f"0..{model.config.num_hidden_layers - 1}, found layer_idx {idx}; supported: {_supported_text()}"
        )
    _register()
    runtime = _Runtime(model, config)
    runtime.attn_modules = attn_modules
    configs = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation_internal"):
            configs[id(c)] = c
    for c in configs.values():
        runtime.saved_attn.append((c, c._attn_implementation_internal))
        _ORIGINAL_IMPL[id(c)] = c._attn_implementation
        c._attn_implementation_internal = ATTN_IMPLEMENTATION
    for m in attn_modules:
        m.__dict__[_RUNTIME_ATTR] = runtime
    for name in _WRAPPED_METHODS:
        if not hasattr(model, name):
            continue
        original, saved = _original_method(model, name)
        runtime.saved_methods[name] = saved
        if name == "generate":
            model.__dict__[name] = _make_generate(model, runtime, original)
        elif name == "_prefill":
            model.__dict__[name] = _make_prefill(model, runtime, original)
        else:
            model.__dict__[name] = _make_prepare_cache(model, runtime, original)
    model.__dict__[_RUNTIME_ATTR] = runtime
    _PATCHED.add(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: restore the attention implementation, the wrapped methods and every
    attribute patch added, and drop the KV engines. Raises ``ValueError`` if ``model`` is not patched.
    When no patched model remains, the ``"raas_flex"`` registrations are removed from transformers."""
    runtime = _runtime_of(model)
    if runtime is None:
        raise ValueError("model is not patched by raas_flex (nothing to unpatch)")
    for c, impl in runtime.saved_attn:
        c._attn_implementation_internal = impl
        _ORIGINAL_IMPL.pop(id(c), None)
    for m in runtime.attn_modules:
        m.__dict__.pop(_RUNTIME_ATTR, None)
    for name, saved in runtime.saved_methods.items():
        if saved is _MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = saved
    del model.__dict__[_RUNTIME_ATTR]
    runtime.active = False
    runtime.pool.clear()
    runtime.pending.clear()
    runtime.last_cache = runtime.generation_cache = None
    runtime.tracer = None
    runtime.attn_modules = []
    _PATCHED.discard(model)
    if len(_PATCHED) == 0:
        _unregister()
    return model


@contextlib.contextmanager
def patched(model: nn.Module, budget: int, **options) -> Iterator[nn.Module]:
    """``with raas_flex.patched(model, budget=L, **options): ...`` patches for the block only. On exit
    an unpatched model is unpatched again; a model that was already patched gets its previous
    options back (so nested blocks work)."""
    runtime = _runtime_of(model)
    previous = runtime.config if runtime is not None else None
    patch(model, budget, **options)
    try:
        yield model
    finally:
        if previous is None:
            if _runtime_of(model) is not None:
                unpatch(model)
        elif _runtime_of(model) is not None:
            _runtime_of(model).configure(previous)


def stats(model_or_cache) -> dict:
    """KV statistics of the last RaaS generation of a patched model (or of a given :class:`RaaSCache`).

    Returns ``{"policy", "budget", "page_size", "batch_size", "layers": [...], "kv_bytes",
    "state_bytes", "evictions"}`` where each layer is ``{"layer", "policy", "backend" (the decode path it
    took: ``PagedKVCache.backend``), "budget", "slots",
    "tokens" (per row, real tokens written), "resident_tokens" (per row), "evictions" (pages evicted
    per row; all KV heads evict together), "kv_bytes" (K and V buffers allocated), "state_bytes"
    (all buffers incl. page table), "overflow"}``; the top-level ``kv_bytes``/``state_bytes``/
    ``evictions`` are totals over layers (and rows, for evictions).
    """
    if isinstance(model_or_cache, RaaSCache):
        cache = model_or_cache
    else:
        runtime = _runtime_of(model_or_cache)
        if runtime is None:
            raise ValueError("stats() needs a model patched by raas_flex.patch, or a RaaSCache")
        cache = runtime.last_cache
        if cache is None:
            raise ValueError("no RaaS generation has run on this model since it was patched (or reconfigured)")
    layers = []
    for layer in cache.layers:
        eng = layer.engine
        if eng is None:
            raise ValueError(f"layer {layer.layer_idx} of this cache holds no prompt yet (no generation ran with it)")
        ps = eng.page_state()
        layers.append(
            {
                "layer": layer.layer_idx,
                "policy": eng.policy.name,
                "backend": eng.backend,
                "budget": eng.config.budget,
                "slots": eng.S,
                "tokens": ps.length.tolist(),
                "resident_tokens": ps.resident_tokens.amax(-1).tolist(),
                "evictions": ps.evictions.amax(-1).tolist(),
                "kv_bytes": eng.kv_bytes,
                "state_bytes": eng.state_bytes,
                "overflow": bool(ps.overflow),
            }
        )
    return {
        "policy": cache.config.policy.name,
        "budget": cache.config.budget,
        "page_size": cache.config.page_size,
        "batch_size": cache.layers[0].engine.B,
        "layers": layers,
        "kv_bytes": sum(entry["kv_bytes"] for entry in layers),
        "state_bytes": sum(entry["state_bytes"] for entry in layers),
        "evictions": sum(sum(entry["evictions"]) for entry in layers),
    }
