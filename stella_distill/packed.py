"""Padding-free forward passes: a batch of texts packed into one row, attention kept inside each text.

Why: with padding, transformers hands SDPA a ``(B, 1, L, L)`` mask, and a mask keeps PyTorch off its
flash-attention kernel (and, for grouped-query attention, makes transformers copy every key/value head
with ``repeat_kv``). Packed texts need no mask at all: attention runs per text through the variable-
length flash kernel (``cu_seq_lens``: where each text starts), and no compute goes to padding.

How: ``register()`` adds :func:`packed_attention` to transformers' ``AttentionInterface`` under
``PACKED_ATTENTION``; a model switched to it (``use_packed_attention``) builds no mask (transformers
skips mask creation for an implementation it has no mask function for) and is called with
``input_ids (1, T)``, ``position_ids`` restarting at 0 for each text and the ``cu_seq_lens_q/k`` /
``max_length_q/k`` keyword arguments that transformers passes down to every attention call
(:func:`pack`). Causal models (Qwen2, Llama) stay causal inside each text, bidirectional ones (BERT;
a decoder whose attention modules or config say ``is_causal = False``, the way gte-Qwen2 makes Qwen2
bidirectional) stay bidirectional.

Only models that use transformers' attention interface (``_supports_attention_backend``) can be
switched; on a GPU the flash kernel needs bf16/fp16 weights. On a CPU each text runs through SDPA on
its own slice (exact, for tests and CPU runs; no speed claim).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

PACKED_ATTENTION = "stella_packed"


def _is_causal(module: torch.nn.Module, is_causal: bool | None) -> bool:
    if is_causal is not None:
        return bool(is_causal)
    config = getattr(module, "config", None)
    return bool(getattr(module, "is_causal", True)) and bool(getattr(config, "is_causal", True))


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over packed texts: ``query (1, H, T, D)``, ``key``/``value``
    ``(1, H_kv, T, D)``; returns ``(1, T, H, D)`` like transformers' SDPA function.

    Texts are the ranges ``cu_seq_lens_q[i]:cu_seq_lens_q[i + 1]``; a token attends to tokens of its
    own text only (causally or not, per the module). ``attention_mask`` must be None (no mask is built
    for this implementation); ``dropout`` is refused (inference and eval only, where it is 0).
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None:
        raise ValueError(
            f"{PACKED_ATTENTION} attention runs on packed inputs only (cu_seq_lens_q, no attention mask)"
        )
    if dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention has no dropout; call the model in eval mode")
    causal = _is_causal(module, is_causal)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, D)
    if q.is_cuda:
        max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, causal, False, scale=scaling
        )[0]
    else:
        out = torch.empty_like(q)
        groups = q.shape[1] // k.shape[1]
        bounds = cu.tolist()
        for start, stop in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (x[start:stop].transpose(0, 1) for x in (q, k, v))
            if groups > 1:
                ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
            out[start:stop] = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=causal, scale=scaling
            ).transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> None:
    """Make ``PACKED_ATTENTION`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether ``model`` routes attention through transformers' interface and takes ``position_ids``."""
    params = inspect.signature(model.forward).parameters
    return bool(getattr(model, "_supports_attention_backend", False)) and "position_ids" in params


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` to packed attention; False (model unchanged) when it cannot be switched."""
    if not supports_packing(model) or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except (ValueError, ImportError, AttributeError):
        return False
    return model.config._attn_implementation == PACKED_ATTENTION


class Packed(NamedTuple):
    """A packed batch on the device: the model's inputs, text boundaries ``cu`` ``(n + 1,)`` and the
    text index of every token ``(T,)`` (for mean pooling without a host sync)."""

    inputs: dict
    cu: torch.Tensor
    text: torch.Tensor


def pack(batch: list[list[int]], device: torch.device) -> Packed:
    """Texts ``batch`` (token ids) packed into one row, on ``device``.

    The inputs are ``input_ids``/``position_ids`` ``(1, T)`` and the ``cu_seq_lens_q/k``,
    ``max_length_q/k`` keywords transformers passes to attention functions. Host tensors are pinned
    and copied without blocking when ``device`` is a GPU.
    """
    lengths = np.fromiter((len(x) for x in batch), dtype=np.int64, count=len(batch))
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in batch])
    starts = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    text = np.repeat(np.arange(len(batch), dtype=np.int64), lengths)
    positions = np.arange(len(ids), dtype=np.int64) - starts[text]
    cu = to_device(torch.from_numpy(starts.astype(np.int32)), device)
    longest = int(lengths.max())
    inputs = {
        "input_ids": to_device(torch.from_numpy(ids)[None], device),
        "position_ids": to_device(torch.from_numpy(positions)[None], device),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    return Packed(inputs, cu, to_device(torch.from_numpy(text), device))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the host on a GPU: pinned, non-blocking (a pageable copy waits
    for the device's queue to drain; the caching host allocator keeps the pinned buffer until the copy
    has run)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def pool_packed(hidden: torch.Tensor, packed: Packed, mode: str) -> torch.Tensor:
    """Pool packed token states ``(1, T, H)`` into ``(n, H)`` the way ``pooling.pool`` pools a padded
    batch: first token, mean (summed in float32), or last token of each text."""
    states = hidden[0]
    cu = packed.cu.long()
    if mode == "cls":
        return states[cu[:-1]]
    if mode == "last_token":
        return states[cu[1:] - 1]
    if mode == "mean":
        n = cu.shape[0] - 1
        sums = torch.zeros(n, states.shape[1], device=states.device, dtype=torch.float32)
        sums.index_add_(0, packed.text, states.float())
        return (sums / (cu[1:] - cu[:-1]).unsqueeze(1).float()).to(states.dtype)
    raise ValueError(f"unknown pooling {mode!r}")
