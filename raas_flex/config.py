"""One validated configuration object for every policy raas_flex runs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

POLICIES = ("raas", "quest", "h2o", "streaming", "dense")
REFRESH_RULES = ("topk", "threshold")
IMPORTANCE = ("bound", "attention")
ATTENTION_KERNELS = ("flex", "triton")
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64")
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def _check_int(name: str, value, *, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class RaaSConfig:
    """Configuration of a paged KV cache and the policy that manages it.

    budget: token slots per (sequence, KV head), prompt included. For the bounded policies
        (raas, h2o, streaming) this is the cache size; quest attends to ``budget`` tokens per step
        but keeps every page; dense ignores it for attention and keeps every page.
    policy: one of ``POLICIES``.
    page_size: tokens per page (16 in the paper).
    refresh: "topk" refreshes the ``refresh_ratio`` share of the budget's pages with the highest
        importance; "threshold" refreshes pages whose attention share exceeds ``refresh_threshold``
        (needs ``importance="attention"``).
    importance: "bound" is Quest's page bound sum_d max(q_d M_d, q_d m_d) over per-page key max M and
        min m; "attention" is the page's share of the softmax mass of the current query.
        Under GQA each KV head aggregates its query heads by max.
    pin_prompt: keep prompt pages resident forever. None takes the policy's default
        (True for raas, False otherwise).
    sink_tokens: tokens kept at the start by the streaming policy (kept at page granularity).
    dense_layers: the first ``dense_layers`` layers of a patched model keep full KV (O(N) memory).
    max_length: total tokens per sequence that quest and dense must hold (their buffer size).
        The Hugging Face patch fills it in from ``generate``'s max_length.
    block_size: KV block size of the attention kernel (must divide the buffer length). None picks
        the policy's default: gcd(buffer, 128) for policies that attend to the whole buffer,
        ``page_size`` for quest (its selection is per page).
    compile_flex: run flex_attention compiled when the step itself is not being compiled.
        None means: compiled on CUDA, eager on CPU (eager flex applies mask_mod densely, which is
        exact but slow; CPU compiles take tens of seconds per shape).
    fused: do the step's bookkeeping with the hand-fused Triton kernels of :mod:`raas_flex.kernels`
        (one append kernel, one observe kernel) instead of the torch code. None means: fused where
        supported (CUDA, Triton installed, policy raas/streaming/h2o, 16/32-bit K/V); True raises
        ValueError where unsupported; False always runs the torch code (the reference).
    attention: the decode step's attention kernel. "flex" (default): flex_attention over the
        compacted buffer with the block mask of its valid slots. "triton" (opt-in; CUDA or the
        Triton interpreter; policy raas with importance="bound", refresh="topk" and fused kernels):
        one Triton kernel does the attention over the same slots and the step's observe, with the
        split-KV combine inside the kernel. It is checked against flex and the torch reference by
        the tests (CPU interpreter and GPU). On an H200 its decode step was 1.08-1.33x faster than
        flex's at batch 8, and up to 1.28x slower at batch 32 with 4 KV heads; under ``generate``
        (Llama-3.1-8B shapes, batch 8) it took 8.60 ms per token against flex's 7.60 in an earlier
        run (README, Performance).
    """

    budget: int
    policy: str = "raas"
    page_size: int = 16
    refresh: str = "topk"
    refresh_ratio: float = 0.5
    refresh_threshold: float = 1e-4
    importance: str = "bound"
    pin_prompt: bool | None = None
    sink_tokens: int = 4
    dense_layers: int = 0
    max_length: int | None = None
    block_size: int | None = None
    compile_flex: bool | None = None
    fused: bool | None = None
    attention: str = "flex"

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, POLICIES)
        _check_int("page_size", self.page_size, low=1)
        _check_int("budget", self.budget, low=1)
        if self.budget % self.page_size:
            raise ValueError(
                f"budget={self.budget} must be a multiple of page_size={self.page_size} "
                f"(e.g. {self.budget // self.page_size * self.page_size or self.page_size} or "
                f"{(self.budget // self.page_size + 1) * self.page_size})"
            )
        if self.budget < 2 * self.page_size:
            raise ValueError(
                f"budget={self.budget} must hold at least 2 pages of page_size={self.page_size}, "
                f"i.e. budget >= {2 * self.page_size}"
            )
        _check_choice("refresh", self.refresh, REFRESH_RULES)
        _check_choice("importance", self.importance, IMPORTANCE)
        if isinstance(self.refresh_ratio, bool) or not isinstance(self.refresh_ratio, (int, float)):
            raise TypeError(f"refresh_ratio must be a float, got {self.refresh_ratio!r}")
        if not 0.0 < self.refresh_ratio <= 1.0:
            raise ValueError(f"refresh_ratio={self.refresh_ratio!r} must be in (0, 1]")
        if self.refresh == "topk" and int(self.refresh_ratio * self.budget_pages) < 1:
            raise ValueError(
                f"refresh_ratio={self.refresh_ratio!r} refreshes no page of the budget's "
                f"{self.budget_pages} pages; allowed: refresh_ratio >= {1 / self.budget_pages:.4g}"
            )
        if isinstance(self.refresh_threshold, bool) or not isinstance(self.refresh_threshold, (int, float)):
            raise TypeError(f"refresh_threshold must be a float, got {self.refresh_threshold!r}")
        if not 0.0 <= self.refresh_threshold < 1.0:
            raise ValueError(f"refresh_threshold={self.refresh_threshold!r} must be in [0, 1)")
        if self.refresh == "threshold" and self.importance != "attention":
            raise ValueError(
                "refresh='threshold' compares attention shares with refresh_threshold and needs "
                f"importance='attention', got importance={self.importance!r}"
            )
        if self.pin_prompt is not None and not isinstance(self.pin_prompt, bool):
            raise TypeError(f"pin_prompt must be True, False or None, got {self.pin_prompt!r}")
        _check_int("sink_tokens", self.sink_tokens, low=0)
        if self.policy == "streaming" and self.sink_pages >= self.budget_pages:
            raise ValueError(
                f"sink_tokens={self.sink_tokens} takes {self.sink_pages} pages of the budget's "
                f"{self.budget_pages}; at least one page must remain for the recent window"
            )
        _check_int("dense_layers", self.dense_layers, low=0)
        if self.max_length is not None:
            _check_int("max_length", self.max_length, low=1)
        if self.block_size is not None:
            _check_int("block_size", self.block_size, low=1)
        if self.compile_flex is not None and not isinstance(self.compile_flex, bool):
            raise TypeError(f"compile_flex must be True, False or None, got {self.compile_flex!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(f"fused must be True, False or None, got {self.fused!r}")
        _check_choice("attention", self.attention, ATTENTION_KERNELS)
        if self.attention == "triton":
            if self.policy != "raas" or self.importance != "bound" or self.refresh != "topk":
                raise ValueError(
                    "attention='triton' runs the RaaS observe with Quest's bound and top-k refresh inside the "
                    f"attention kernel: it needs policy='raas', importance='bound', refresh='topk'; got "
                    f"policy={self.policy!r}, importance={self.importance!r}, refresh={self.refresh!r}"
                )
            if self.fused is False:
                raise ValueError("attention='triton' needs the fused kernels; got fused=False")

    # -- derived quantities -------------------------------------------------------------------
    @property
    def budget_pages(self) -> int:
        return self.budget // self.page_size

    @property
    def sink_pages(self) -> int:
        return -(-self.sink_tokens // self.page_size)

    @property
    def bounded(self) -> bool:
        """True when the cache holds at most ``budget`` tokens (O(L) memory)."""
        return self.policy in ("raas", "h2o", "streaming")

    @property
    def pins_prompt(self) -> bool:
        if self.pin_prompt is not None:
            return self.pin_prompt
        return self.policy == "raas"

    @property
    def recent_pages(self) -> int:
        """H2O: the most recent pages protected from eviction (half the budget, rounded up)."""
        return self.budget_pages - self.budget_pages // 2

    @property
    def refresh_pages(self) -> int:
        return int(self.refresh_ratio * self.budget_pages)

    def slots(self, max_length: int | None = None) -> int:
        """Token slots of the KV buffer per (sequence, KV head)."""
        if self.bounded:
            return self.budget
        n = max_length if max_length is not None else self.max_length
        if n is None:
            raise ValueError(
                f"policy={self.policy!r} keeps every page (O(N) memory) and needs max_length, "
                "the most tokens a sequence will hold; got max_length=None"
            )
        pages = -(-n // self.page_size)
        return max(pages, self.budget_pages) * self.page_size

    def kernel_block(self, slots: int) -> int:
        if self.block_size is not None:
            if slots % self.block_size:
                raise ValueError(f"block_size={self.block_size} must divide the buffer length {slots}")
            return self.block_size
        if self.policy == "quest":
            return self.page_size
        return math.gcd(slots, 128)

    def replace(self, **changes) -> "RaaSConfig":
        return dataclasses.replace(self, **changes)


def parse_options(items) -> dict:
    """Command-line ``KEY=VALUE`` strings -> RaaSConfig keyword arguments.

    Values are read as Python literals where they parse (``0.5``, ``True``, ``None``) and kept as
    strings otherwise: ``["refresh=threshold", "refresh_threshold=0.01"]`` ->
    ``{"refresh": "threshold", "refresh_threshold": 0.01}``. RaaSConfig validates them.
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
