"""Fused projections: q/k/v as one matrix product and gate/up as one, for decoding.

At decode sizes a step reads every weight once, and the products are the largest part of it. A
model that runs q, k and v (and gate and up) as separate products pays for the small ones (k and v
of a GQA model are a quarter of q): more launches, split-K reductions, tiles that do not fill the
GPU. :func:`fuse_projections` stores each group's weights in one tensor and makes the group's first
``nn.Linear`` run the one product; the others return their slice of it.

    model = raas_flex.fuse_projections(model)    # in place; state_dict keys and modules unchanged
    model = raas_flex.patch(model, budget=2048)  # independent of it: works patched or not
    raas_flex.unfuse_projections(model)          # separate weights again

How: each group's ``Parameter``s become views of the fused tensor (same values, same objects,
``load_state_dict`` writes through them), which the first ``Linear`` holds as a non-persistent
buffer. Each ``Linear`` of the group gets an instance ``forward``: the first runs the product and
leaves the other parts, with its input, for the rest; one of the others called with that same input
object returns its part, otherwise (another input, or called first) it runs its own product, which
gives the same result. transformers' attention and MLP forwards call the group in order on one
tensor, so under ``torch.compile`` the fused product is one ``mm`` in the graph.

For inference only: with gradients enabled a fused ``Linear`` raises (its product reads the fused
tensor, not the ``Parameter``s). Fuse after moving or casting the model (``model.to`` copies the
views and the buffer apart: still correct, but twice the memory) and unfuse before editing
weights in place other than by ``load_state_dict``.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GROUPS", "fuse_projections", "unfuse_projections"]

#: The attribute names fused together, in the order transformers' forwards call them.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_GROUP = "_raas_flex_fused"  # on each Linear of a group: (the shared _Group, its index)


class _Group:
    """One fused group: the sizes of its parts and what the first product left for the others."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.pending: tuple | None = None  # (input, parts) between the first product and the last part


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    group, i = self.__dict__[_GROUP]
    if torch.is_grad_enabled() and self.weight.requires_grad:
        raise RuntimeError("fused projections are for inference (its product does not reach the Parameters' "
                           "gradients): run under torch.no_grad() / inference_mode, or unfuse_projections(model)")
    if i == 0:
        y = F.linear(x, self.raas_flex_fused_weight, self.raas_flex_fused_bias)
        parts = y.split(group.sizes, dim=-1)
        group.pending = (x, parts)
        return parts[0]
    pending = group.pending
    if pending is None or pending[0] is not x:
        return F.linear(x, self.weight, self.bias)
    if i == len(group.sizes) - 1:
        group.pending = None
    return pending[1][i]


def _linears(path: str, module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | None:
    linears = [getattr(module, n, None) for n in names]
    if not all(type(lin) is nn.Linear for lin in linears):  # quantized and other Linear types are left alone
        return None
    for name, lin in zip(names, linears):
        where = f"{path}.{name}" if path else name
        if "forward" in lin.__dict__:
            raise ValueError(f"fuse_projections: {where} has a forward of its own (a hook, e.g. accelerate's "
                             "offloading); fusing would replace it. Load the model without it to fuse")
        if type(lin.weight.data) is not torch.Tensor:
            raise ValueError(f"fuse_projections: {where}.weight is a {type(lin.weight.data).__name__}; only plain "
                             "tensors (not sharded or subclassed ones) can be fused")
    first = linears[0]
    same = all(lin.in_features == first.in_features and lin.weight.dtype == first.weight.dtype
               and lin.weight.device == first.weight.device and (lin.bias is None) == (first.bias is None)
               for lin in linears)
    return linears if same else None


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse every q/k/v and gate/up group of ``nn.Linear`` layers of ``model`` (see the module's
    docstring); in place, returns ``model``. Raises ``ValueError`` if the model has no such group, is
    already fused, or a group's ``Linear`` has a forward of its own (a hook) or a weight that is not a
    plain tensor (sharded, subclassed); ``TypeError`` if ``model`` is not an ``nn.Module``. Nothing is
    changed when it raises."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(_GROUP in m.__dict__ for m in model.modules()):
        raise ValueError("model already has fused projections (unfuse_projections(model) first)")
    groups = [lins for path, m in model.named_modules() for names in GROUPS if (lins := _linears(path, m, names))]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no fusable projections: no module holds nn.Linear "
                         f"layers named {' / '.join(', '.join(g) for g in GROUPS)} with one input size, dtype "
                         "and device")
    for lins in groups:
        leader = lins[0]
        weight = torch.cat([lin.weight.detach() for lin in lins])
        bias = torch.cat([lin.bias.detach() for lin in lins]) if leader.bias is not None else None
        group = _Group([lin.out_features for lin in lins])
        row = 0
        for i, lin in enumerate(lins):
            n = lin.out_features
            lin.weight.data = weight[row:row + n]
            if bias is not None:
                lin.bias.data = bias[row:row + n]
            row += n
            lin.__dict__[_GROUP] = (group, i)
            lin.forward = types.MethodType(_forward, lin)
        leader.register_buffer("raas_flex_fused_weight", weight, persistent=False)
        leader.register_buffer("raas_flex_fused_bias", bias, persistent=False)
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_projections`: each ``Parameter`` gets its own contiguous storage again and
    the ``Linear`` layers their class's forward; in place, returns ``model``. Raises ``ValueError``
    if nothing in ``model`` is fused."""
    fused = [m for m in model.modules() if _GROUP in m.__dict__]
    if not fused:
        raise ValueError("model has no fused projections (nothing to unfuse)")
    for lin in fused:
        group, i = lin.__dict__.pop(_GROUP)
        del lin.forward
        lin.weight.data = lin.weight.detach().clone()
        if lin.bias is not None:
            lin.bias.data = lin.bias.detach().clone()
        if i == 0:
            del lin.raas_flex_fused_weight, lin.raas_flex_fused_bias
    return model
