"""raas_flex: reasoning-aware KV-cache sparsity (RaaS) on FlexAttention.

Nothing is patched at import time: call ``raas_flex.patch(model, budget=L)``. Attention tracing:
``raas_flex.tracing`` (raas_flex.trace); plots: ``raas_flex.plots`` (needs matplotlib).
"""

from .config import POLICIES, RaaSConfig
from .engine import PageState, PagedKVCache
from .policies import POLICY_CLASSES, Policy, make_policy
from .trace import AttentionTrace, MapClass, classify_heads, classify_map, summary_table, tracing

__all__ = ["POLICIES", "POLICY_CLASSES", "PageState", "PagedKVCache", "Policy", "RaaSConfig", "make_policy",
           "RaaSCache", "SUPPORTED_MODEL_TYPES", "patch", "patched", "stats", "unpatch",
           "AttentionTrace", "MapClass", "classify_heads", "classify_map", "summary_table", "tracing"]
__version__ = "0.1.0"

# The transformers integration (raas_flex.hf) is imported on first use, so that `import raas_flex`
# does not import transformers. Importing it registers nothing: patch() does.
_HF_NAMES = ("RaaSCache", "SUPPORTED_MODEL_TYPES", "patch", "patched", "stats", "unpatch")


def __getattr__(name):
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
