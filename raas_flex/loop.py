"""A lean greedy decode loop for a patched model, for when ``model.generate``'s own per-token host
work is what limits the step.

``generate`` runs Python per token (input preparation, logits processors, stopping criteria); a
patched ``generate`` on CUDA reads "has every row finished?" one step late, so that work overlaps
the GPU's as long as it is shorter than a step, and the host runs at most one step ahead.
:func:`greedy_decode` calls the same compiled decode forward (``generate``'s own, from
``model.get_compiled_call``) in a plain loop: argmax on the device, the end-of-sequence state kept on
the device, and one host check every ``_STOP_CHECK`` tokens, so the host queues many steps ahead of
the GPU (in the style of gpt-fast). Its tokens are ``generate``'s with ``do_sample=False`` for the same
inputs, except that no logits processor of the model's generation config runs (it warns when the
config sets one).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .hf import generate_cache_key
from .hf_cache import RaaSCache, _runtime_of

__all__ = ["greedy_decode"]

# Tokens between two host checks of "has every row finished" (the only host syncs of the loop).
_STOP_CHECK = 64
# generation-config fields that make generate's greedy tokens differ from a plain argmax, with the
# value that means "off"
_PROCESSOR_FIELDS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None, "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
}


def _token_ids(name: str, value) -> list[int] | None:
    if value is None:
        return None
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, (list, tuple)) or not ids or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"{name} must be a non-negative int, a non-empty list of them, or None, got {value!r}")
    return list(ids)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def greedy_decode(model: nn.Module, input_ids: Tensor, max_new_tokens: int, *, attention_mask: Tensor | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                  min_new_tokens: int = 0, compile: bool | None = None, compile_config=None) -> Tensor:
    """Greedy decoding of a model patched by :func:`raas_flex.patch`, without ``generate``'s loop.

    Args:
        model: a patched causal LM.
        input_ids: ``[B, P]`` prompt token ids (left-padded when ``attention_mask`` marks padding).
        max_new_tokens: tokens to generate at most (>= 1).
        attention_mask: ``[B, P]`` 0/1 mask of the prompt (left padding), as for ``generate``.
        eos_token_id, pad_token_id: default to the model's generation config (pad to the first eos
            id, as ``generate`` does). A row that has produced an eos id is padded from then on; the
            loop ends when every row has, as ``generate`` does.
        min_new_tokens: eos ids are not chosen before this many new tokens (``generate``'s option).
        compile: run the decode forward compiled (``generate``'s compiled call: Inductor with CUDA
            graphs by default). None: compile on CUDA, not on CPU, as ``generate`` does.
        compile_config: a ``transformers.CompileConfig`` for that compile (default: as ``generate``, the
            model's ``generation_config.compile_config``, else transformers' default).

    Returns:
        ``[B, P + n]``: the prompt and the ``n <= max_new_tokens`` new tokens, as ``generate`` returns.
    """
    runtime = _runtime_of(model)
    if runtime is None or not runtime.active:
        raise ValueError("greedy_decode needs a model patched by raas_flex.patch(model, budget=...)")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be a [batch, prompt] LongTensor with at least one token, got "
                         + (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, Tensor) else repr(input_ids)))
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("min_new_tokens", min_new_tokens, 0)
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         + (f"{tuple(attention_mask.shape)}" if isinstance(attention_mask, Tensor) else repr(attention_mask)))
    if compile not in (None, True, False):
        raise ValueError(f"compile must be True, False or None (compile on CUDA), got {compile!r}")
    gen = model.generation_config
    eos = _token_ids("eos_token_id", eos_token_id if eos_token_id is not None else gen.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
    if pad is None and eos is not None:
        pad = eos[0]
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
        raise ValueError(f"pad_token_id must be a non-negative int or None, got {pad!r}")
    ignored = [f"{f}={getattr(gen, f)!r}" for f, off in _PROCESSOR_FIELDS.items()
               if getattr(gen, f, off) not in (off, None, [], {})]
    if ignored:
        warnings.warn(f"greedy_decode takes the plain argmax; the model's generation config sets {', '.join(ignored)}, "
                      "which generate would apply and greedy_decode does not", UserWarning, stacklevel=2)

    device = input_ids.device
    B, P = input_ids.shape
    cache = RaaSCache(model)
    cache.prepare_generation(P + max_new_tokens - 1)  # sizes quest/dense buffers for the whole run
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    cache._prompt_tokens = int(mask.sum(-1).max())
    key = generate_cache_key(model)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                       **{key: cache}).logits[:, -1]
        compiled = compile if compile is not None else device.type == "cuda"
        if compile_config is None:  # as generate: the generation config's, else transformers' default
            compile_config = getattr(model.generation_config, "compile_config", None)
        forward = model.get_compiled_call(compile_config) if compiled else model.__call__
        eos_t = torch.tensor(eos, device=device) if eos is not None else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        pos = pos[:, -1:]
        n = max_new_tokens
        for i in range(max_new_tokens):
            if eos_t is not None and i < min_new_tokens:
                logits = logits.index_fill(-1, eos_t, float("-inf"))
            tok = logits.argmax(-1)
            if eos_t is not None:  # a finished row emits pad; a row finishes on its eos token
                tok = torch.where(done, pad, tok)
                done = done | torch.isin(tok, eos_t)
            out[:, i] = tok
            if i + 1 == max_new_tokens:
                break
            if eos_t is not None and (i + 1) % _STOP_CHECK == 0 and bool(done.all()):  # host sync, 1 in 64
                n = i + 1
                break
            pos = pos + 1
            logits = forward(input_ids=tok[:, None], position_ids=pos, use_cache=True, **{key: cache}).logits[:, -1]
        if eos_t is not None:  # generate stops at the step where the last row finished
            last = _all_done_at(out[:, :n], eos_t)
            n = n if last is None else last + 1
    cache.check()
    return torch.cat([input_ids, out[:, :n]], 1)


def _all_done_at(tokens: Tensor, eos: Tensor) -> int | None:
    """The first step at which every row of ``tokens`` ``[B, n]`` has emitted an eos id, or None."""
    hit = torch.isin(tokens, eos).cummax(-1).values.all(0)  # [n]: every row finished by this step
    idx = torch.nonzero(hit)
    return int(idx[0]) if idx.numel() else None
