"""raas_flex: reasoning-aware KV-cache sparsity (RaaS) on FlexAttention.

Nothing is patched at import time: call ``raas_flex.patch(model, budget=L)``.
"""

from .config import POLICIES, RaaSConfig
from .engine import PageState, PagedKVCache
from .policies import POLICY_CLASSES, Policy, make_policy

__all__ = ["POLICIES", "POLICY_CLASSES", "PageState", "PagedKVCache", "Policy", "RaaSConfig", "make_policy"]
__version__ = "0.1.0"
