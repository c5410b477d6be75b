"""Flax integration: flash attention behind Flax's ``attention_fn`` hook.

``attention_fn`` takes the arguments that ``flax.linen.MultiHeadDotProductAttention``
and ``flax.nnx.MultiHeadAttention`` pass to their ``attention_fn`` (the signature of
``flax.linen.dot_product_attention`` / ``flax.nnx.dot_product_attention``), so::

    layer = nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=attention_fn)

runs ``pallas_attention.flash_attention`` with the same parameters, inputs and
results, except on rows that can attend to nothing: Flax averages all values there,
we return zeros (as ``flash_attention`` does).

Calls flash attention cannot serve exactly go to Flax's own attention, with a
warning, so the answer is always right: attention weights to sow (``module`` set),
dropout in training (no fused dropout yet), and custom einsum functions.
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp

from pallas_attention.api import flash_attention


def _flatten_batch(x, batch_dims: tuple[int, ...], tail: int):
  """``[*batch, ...tail dims]`` as ``[B, ...]``; an all-ones batch stays 1 (broadcast)."""
  lead = x.shape[: x.ndim - tail]
  if all(d == 1 for d in lead):
    return x.reshape((1, *x.shape[x.ndim - tail :]))
  x = jnp.broadcast_to(x, (*batch_dims, *x.shape[x.ndim - tail :]))
  return x.reshape((math.prod(batch_dims), *x.shape[len(batch_dims) :]))


def _flax_fallback(why: str, nnx_caller: bool, **kwargs):
  warnings.warn(f"pallas_attention.flax: {why}; using Flax's attention", stacklevel=3)
  if nnx_caller:
    from flax import nnx

    return nnx.dot_product_attention(**kwargs)
  from flax import linen

  kwargs.pop("is_causal", None)
  kwargs.pop("promote_dtype", None)
  return linen.dot_product_attention(**kwargs)


def attention_fn(
  query,
  key,
  value,
  bias=None,
  mask=None,
  broadcast_dropout: bool = True,
  dropout_rng=None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype=None,
  precision=None,
  module=None,
  force_fp32_for_softmax: bool = False,
  einsum_dot_general=None,
  qk_attn_weights_einsum=None,
  attn_weights_value_einsum=None,
  promote_dtype=None,
  is_causal: bool = False,
  implementation=None,
):
  """Flash attention with the signature of ``flax.linen.dot_product_attention``.

  Args (as Flax's): ``query [..., T, N, H]``, ``key``/``value [..., S, K, H]``
  (``N % K == 0``); ``bias``/``mask`` broadcastable to ``[..., N, T, S]``, the mask
  bool or float (nonzero = attend, as ``make_attention_mask`` builds it in
  float32); ``dtype`` the computation dtype (inputs are cast to it);
  ``precision`` and ``force_fp32_for_softmax`` are accepted and ignored (products
  accumulate and the softmax runs in float32 always); ``promote_dtype`` (NNX) is
  applied; ``is_causal`` (NNX) uses the causal tile skipping instead of a mask.
  ``implementation``: passed to ``flash_attention``.
  """
  nnx_caller = promote_dtype is not None
  flax_kwargs = dict(
    query=query,
    key=key,
    value=value,
    bias=bias,
    mask=mask,
    broadcast_dropout=broadcast_dropout,
    dropout_rng=dropout_rng,
    dropout_rate=dropout_rate,
    deterministic=deterministic,
    dtype=dtype,
    precision=precision,
    module=module,
  )
  if nnx_caller:
    flax_kwargs.update(promote_dtype=promote_dtype, is_causal=is_causal)
  else:
    flax_kwargs.update(
      force_fp32_for_softmax=force_fp32_for_softmax,
      einsum_dot_general=einsum_dot_general,
      qk_attn_weights_einsum=qk_attn_weights_einsum,
      attn_weights_value_einsum=attn_weights_value_einsum,
    )
    if is_causal:  # linen's function has no is_causal: fold it into the mask
      from flax import linen

      causal = linen.make_causal_mask(jnp.zeros(query.shape[:-2]), dtype=jnp.bool_)
      flax_kwargs["mask"] = causal if mask is None else linen.combine_masks(mask, causal)
  if module is not None:
    return _flax_fallback("attention weights are sown (module is set)", nnx_caller, **flax_kwargs)
  if dropout_rate > 0.0 and not deterministic:
    return _flax_fallback("dropout is not fused yet", nnx_caller, **flax_kwargs)
  einsums = (einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum)
  if any(f is not None for f in einsums):
    return _flax_fallback("custom einsum functions", nnx_caller, **flax_kwargs)

  if nnx_caller:
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
  elif dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  if query.ndim < 3:
    raise ValueError(f"query: expected [..., T, N, H], got shape {query.shape}")
  batch_dims = query.shape[:-3]
  flat = lambda x: _flatten_batch(x, batch_dims, 3)  # noqa: E731
  q, k, v = (x.reshape((math.prod(batch_dims), *x.shape[-3:])) for x in (query, key, value))
  if mask is not None:
    mask = mask if mask.dtype == jnp.bool_ else mask != 0
    mask = flat(mask)
  if bias is not None:
    bias = flat(bias)
  out = flash_attention(q, k, v, bias, mask, is_causal=is_causal, implementation=implementation)
  return out.reshape(query.shape[:-1] + (value.shape[-1],))
