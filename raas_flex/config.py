"""Cache-wide settings, and the one place user-facing option names become a configuration."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .policies import POLICY_CLASSES, Policy, RaaS, check_int, make_policy

BACKENDS = ("torch", "flex", "triton")
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64")
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
POLICIES = tuple(POLICY_CLASSES)


@dataclass(frozen=True)
class RaaSConfig:
    """Settings of a paged KV cache that do not depend on the policy.

    budget: token slots per (sequence, KV head), prompt included. The bounded policies (raas, h2o,
        streaming) hold exactly this many; quest attends to ``budget`` tokens per step but keeps
        every page; dense ignores it.
    policy: a :class:`~raas_flex.policies.Policy` (or its name, for the policy's defaults).
    page_size: tokens per page (16 in the paper).
    dense_layers: the first ``dense_layers`` layers of a patched model keep every token (O(N) memory).
    max_length: tokens per sequence that the O(N) policies (quest, dense) must hold. The Hugging
        Face patch fills it in from ``generate``'s max_length.
    block_size: KV block of the flex kernel (must divide the buffer). None: gcd(buffer, 128), or
        ``page_size`` for a policy that picks pages (quest, which allows only that).
    backend: how a decode step runs, fixed when the cache is built (see :mod:`raas_flex.engine`):
        "torch" (torch ops + flex_attention; every policy, every device, every layer), "flex" (CUDA:
        one Triton bookkeeping kernel + flex_attention; every policy, quest's page choice by two
        more kernels; layers without a sliding window), "triton" (CUDA: the whole step in one Triton
        kernel, a layer's window, softcap and sinks included; quest: its append with the page
        bounds, the page choice and the attention over the chosen pages in three, no window). None:
        the fastest backend that serves the policy and the layer on the cache's device (triton on
        CUDA where it serves).
    compile_flex: run flex_attention compiled when the step itself is not being compiled. None:
        compiled on CUDA, eager on CPU.
    """

    budget: int
    policy: Policy = RaaS()
    page_size: int = 16
    dense_layers: int = 0
    max_length: int | None = None
    block_size: int | None = None
    backend: str | None = None
    compile_flex: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.policy, str):
            object.__setattr__(self, "policy", make_policy(self.policy))
        if not isinstance(self.policy, Policy):
            raise TypeError(f"policy must be a policy name or a raas_flex Policy, got {self.policy!r}")
        check_int("page_size", self.page_size, low=1)
        check_int("budget", self.budget, low=1)
        if self.budget % self.page_size:
            low = self.budget // self.page_size * self.page_size or self.page_size
            raise ValueError(f"budget={self.budget} must be a multiple of page_size={self.page_size} "
                             f"(e.g. {low} or {low + self.page_size})")
        if self.budget < 2 * self.page_size:
            raise ValueError(f"budget={self.budget} must hold at least 2 pages of page_size={self.page_size}, "
                             f"i.e. budget >= {2 * self.page_size}")
        check_int("dense_layers", self.dense_layers, low=0)
        for name in ("max_length", "block_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=1)
        if self.policy.narrows and self.block_size not in (None, self.page_size):
            raise ValueError(f"policy={self.policy.name!r} lists the pages it picks as the flex kernel's KV blocks: "
                             f"block_size must be None or page_size={self.page_size}, got {self.block_size}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not supported; allowed: None, "
                             f"{', '.join(map(repr, BACKENDS))}")
        if self.compile_flex is not None and not isinstance(self.compile_flex, bool):
            raise TypeError(f"compile_flex must be True, False or None, got {self.compile_flex!r}")
        self.policy.validate(self.budget_pages, self.page_size)

    @property
    def budget_pages(self) -> int:
        return self.budget // self.page_size

    def slots(self, max_length: int | None = None) -> int:
        """Token slots of the KV buffer per (sequence, KV head)."""
        if self.policy.bounded:
            return self.budget
        n = max_length if max_length is not None else self.max_length
        if n is None:
            raise ValueError(f"policy={self.policy.name!r} keeps every page (O(N) memory) and needs max_length, "
                             "the most tokens a sequence will hold; got max_length=None")
        return max(-(-n // self.page_size), self.budget_pages) * self.page_size

    def kernel_block(self, slots: int) -> int:
        if self.block_size is not None:
            if slots % self.block_size:
                raise ValueError(f"block_size={self.block_size} must divide the buffer length {slots}")
            return self.block_size
        return self.page_size if self.policy.narrows else math.gcd(slots, 128)

    def replace(self, **changes) -> "RaaSConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class AttentionSpec:
    """The model's own attention semantics that a layer's cache composes with its policy.

    window: sliding window in tokens (a query sees the ``window`` newest tokens, itself included,
        counted in logical positions); None for full attention.
    softcap: logit soft-capping, scores -> softcap * tanh(scores / softcap) (Gemma 2); None for none.
    sinks: the layer has learned per-head sink logits that join every softmax's denominator and
        contribute no value (gpt-oss); set them with :meth:`PagedKVCache.set_sinks`.
    """

    window: int | None = None
    softcap: float | None = None
    sinks: bool = False

    def __post_init__(self) -> None:
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"window must be a positive int or None, got {self.window!r}")
        if self.softcap is not None and (isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float))
                                         or not self.softcap > 0):
            raise ValueError(f"softcap must be a positive float or None, got {self.softcap!r}")
        if not isinstance(self.sinks, bool):
            raise TypeError(f"sinks must be True or False, got {self.sinks!r}")

    @property
    def plain(self) -> bool:
        return self.window is None and self.softcap is None and not self.sinks


CONFIG_OPTIONS = tuple(f.name for f in dataclasses.fields(RaaSConfig) if f.name not in ("budget", "policy"))


def make_config(budget: int, policy: str | Policy = "raas", **options) -> RaaSConfig:
    """The configuration for user-facing options: ``make_config(1024, "raas", refresh_ratio=0.25,
    page_size=16)``. Options named by the policy's fields go to the policy, the others to
    :class:`RaaSConfig`; with a policy object, only cache-wide options are accepted."""
    cache_opts = {k: v for k, v in options.items() if k in CONFIG_OPTIONS}
    policy_opts = {k: v for k, v in options.items() if k not in CONFIG_OPTIONS}
    if isinstance(policy, Policy):
        if policy_opts:
            raise TypeError(f"options {sorted(policy_opts)} are not cache-wide options and policy is already a "
                            f"{type(policy).__name__} object: set them on it; cache-wide options: {', '.join(CONFIG_OPTIONS)}")
    else:
        policy = make_policy(policy, extra_allowed=CONFIG_OPTIONS, **policy_opts)
    return RaaSConfig(budget=budget, policy=policy, **cache_opts)


def parse_options(items) -> dict:
    """Command-line ``KEY=VALUE`` strings -> keyword arguments for :func:`make_config`.

    Values are read as Python literals where they parse (``0.5``, ``True``, ``None``) and kept as
    strings otherwise: ``["refresh=threshold", "refresh_threshold=0.01"]`` ->
    ``{"refresh": "threshold", "refresh_threshold": 0.01}``.
    """
    import ast

    out = {}
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"options must be 'KEY=VALUE' strings, got {item!r}")
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"option must be KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_spec(spec: str) -> tuple[str, dict]:
    """A configuration named by its user-facing options, as the benchmarks write it:
    ``"raas"`` -> ("raas", {}); ``"raas:importance=attention,refresh=threshold"`` ->
    ("raas", {"importance": "attention", "refresh": "threshold"})."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a configuration is 'POLICY' or 'POLICY:KEY=VALUE,...', got {spec!r}")
    name, _, rest = spec.partition(":")
    if name not in POLICY_CLASSES:
        raise ValueError(f"configuration {spec!r}: policy {name!r} is not one of {', '.join(POLICY_CLASSES)}")
    return name, parse_options([item for item in rest.split(",") if item])


def prompt_slots(tokens: int, page_size: int, bounded: bool) -> int:
    """The fewest buffer slots (a bounded policy's budget, else max_length) that hold a prompt of
    ``tokens`` tokens: its pages, and for a bounded policy one free page for decoding."""
    return (-(-tokens // page_size) + (1 if bounded else 0)) * page_size


class PromptTooLongError(ValueError):
    """A prompt that does not fit the buffer; ``slots`` is the size that would hold it."""

    def __init__(self, reason: str, tokens: int, slots: int) -> None:
        super().__init__(f"{reason}; use at least {slots}")
        self.reason, self.tokens, self.slots = reason, tokens, slots
