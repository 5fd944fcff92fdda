"""raas_flex: reasoning-aware KV-cache sparsity (RaaS) on FlexAttention.

Nothing is patched at import time: call ``raas_flex.patch(model, budget=L)``. Policies are small
dataclasses (``RaaS``, ``Quest``, ``H2O``, ``Streaming``, ``Dense``); attention tracing:
``raas_flex.tracing``; plots: ``raas_flex.plots`` (needs matplotlib).
"""

from .config import BACKENDS, POLICIES, AttentionSpec, RaaSConfig, make_config
from .engine import PageState, PagedKVCache
from .policies import POLICY_CLASSES, H2O, Dense, Policy, Quest, RaaS, Streaming, make_policy
from .projections import fuse_projections, unfuse_projections
from .trace import AttentionTrace, MapClass, classify_heads, classify_map, summary_table, tracing

__all__ = ["AttentionSpec", "BACKENDS", "POLICIES", "POLICY_CLASSES", "PageState", "PagedKVCache", "Policy", "RaaS", "Quest", "H2O",
           "Streaming", "Dense", "RaaSConfig", "make_config", "make_policy", "fuse_projections", "unfuse_projections",
           "RaaSCache", "SUPPORTED_MODEL_TYPES", "greedy_decode", "patch", "patched", "stats", "unpatch",
           "AttentionTrace", "MapClass", "classify_heads", "classify_map", "summary_table", "tracing"]
__version__ = "0.2.0"

# The transformers integration (raas_flex.hf) is imported on first use, so that `import raas_flex`
# does not import transformers. Importing it registers nothing: patch() does.
_HF_NAMES = ("RaaSCache", "SUPPORTED_MODEL_TYPES", "patch", "patched", "stats", "unpatch")


def __getattr__(name):
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    if name == "greedy_decode":
        from .loop import greedy_decode

        return greedy_decode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
