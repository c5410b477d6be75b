"""Dense attention with the exact semantics of flash_attention: the test oracle.

It materialises the ``[B, N, T, S]`` logits, so it is for checking, not for use.
Run it on float64 inputs (``jax.experimental.enable_x64``) for a reference that
the float32 kernels can be measured against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_attention import masks


def attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size=None,
):
  """``(out [B, T, N, H], lse [B, N, T])`` in the inputs' dtype; batched inputs only.

  Rows that attend to nothing give zero output, ``-inf`` lse and zero gradients.
  """
  b, t, n, h = query.shape
  s, num_kv_heads = key.shape[1], key.shape[2]
  groups = n // num_kv_heads
  key = jnp.repeat(key, groups, axis=2)
  value = jnp.repeat(value, groups, axis=2)
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  if isinstance(local_window_size, int):
    local_window_size = (local_window_size, local_window_size)
  left, right = local_window_size or (None, None)
  spec = masks.MaskSpec(is_causal, left, right)
  q_len = jnp.full((b,), t) if query_seq_lengths is None else jnp.asarray(query_seq_lengths)
  kv_len = jnp.asarray(
    jnp.full((b,), s) if key_value_seq_lengths is None else key_value_seq_lengths
  )

  logits = scale * jnp.einsum("btnh,bsnh->bnts", query, key)
  if bias is not None:
    logits = logits + bias
  rows, cols = jnp.arange(t), jnp.arange(s)
  keep = jax.vmap(lambda ql, kl: masks.element_mask(rows, cols, spec, ql, kl))(q_len, kv_len)
  keep = keep[:, None]
  if mask is not None:
    keep = keep & mask
  logits = jnp.where(keep, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  empty = denom == 0.0
  probs = weights / jnp.where(empty, 1.0, denom)
  out = jnp.einsum("bnts,bsnh->btnh", probs, value)
  lse = jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, denom)) + row_max)[..., 0]
  return out, lse
