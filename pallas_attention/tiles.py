"""Tile arithmetic of FlashAttention, shared by the Pallas kernels and the XLA path.

Each function works on one tile of one head: queries ``[bq, H]``, keys and values
``[bk, H]``. Scores live in the base-2 domain (``log2(e)`` folded into the scale)
so the kernels use ``exp2``; the log-sum-exp they keep is base-2 as well and is
converted to natural log only at the public boundary.

For one head, with ``s = scale * q kᵀ + bias`` masked to ``-inf``::

    p = softmax(s),  o = p v,  lse = log Σ exp(s)
    backward:  dv = pᵀ do,  dp = do vᵀ,  ds = p ⊙ (dp − δ),  δ = rowsum(do ⊙ o) − dlse
               dq = scale · ds k,  dk = scale · dsᵀ q,  dbias = ds

A row with nothing to attend to keeps a zero denominator: its output is zero and its
log-sum-exp ``-inf``; the backward turns that ``-inf`` into ``+inf`` so that its
probabilities come out as exactly zero rather than NaN.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


# Float32 products at full float32 accuracy: no TF32 rounding.
EXACT = lax.Precision.HIGHEST


def dot(a, b, dims=_NN, precision=EXACT):
  """Matrix product with float32 accumulation."""
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def dot_nt(a, b, precision=EXACT):
  return dot(a, b, _NT, precision)


def dot_tn(a, b, precision=EXACT):
  return dot(a, b, _TN, precision)


def scores(q, k, scale: float, bias=None, keep=None, precision=EXACT):
  """Base-2 logits ``[bq, bk]`` in float32; ``-inf`` where ``keep`` is False."""
  s = dot_nt(q, k, precision) * (scale * LOG2E)
  if bias is not None:
    s = s + bias.astype(jnp.float32) * LOG2E
  if keep is not None:
    s = jnp.where(keep, s, -jnp.inf)
  return s


def softmax_step(s, v, m, denom, acc, precision=EXACT):
  """One online-softmax update with score tile ``s`` and value tile ``v``.

  ``m`` is the running row maximum, ``denom`` the running denominator (both
  ``[bq]``), ``acc`` the unnormalised output ``[bq, H]`` in float32.
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  # Rows that have seen only masked scores keep m = -inf; shift them by zero
  # so exp2 gives 0 instead of NaN.
  m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp2(m - m_shift)
  p = jnp.exp2(s - m_shift[:, None])
  denom = denom * alpha + jnp.sum(p, axis=1)
  acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision=precision)
  return m_new, denom, acc


def softmax_init(q):
  """The empty online-softmax state ``(m, denom, acc)`` for a query tile ``q [bq, H]``.

  Built from ``q`` so that inside ``shard_map`` it varies over the same mesh axes
  as the updates (a loop rejects a carry whose axes change).
  """
  block_q = q.shape[0]
  m = jnp.full_like(q, -jnp.inf, jnp.float32, shape=(block_q,))
  denom = jnp.zeros_like(q, jnp.float32, shape=(block_q,))
  acc = jnp.zeros_like(q, jnp.float32)
  return m, denom, acc


def softmax_finish(m, denom, acc):
  """Normalised output ``[bq, H]`` (float32) and base-2 log-sum-exp ``[bq]``."""
  empty = denom == 0.0
  safe = jnp.where(empty, 1.0, denom)
  out = acc / safe[:, None]
  lse2 = jnp.where(empty, -jnp.inf, m + jnp.log2(safe))
  return out, lse2


def backward_lse(lse2):
  """The base-2 log-sum-exp the backward subtracts: ``+inf`` for empty rows."""
  return jnp.where(lse2 == -jnp.inf, jnp.inf, lse2)


def score_grad(s, v, do, lse2, delta, precision=EXACT):
  """Probabilities ``p`` and logit gradients ``ds`` of one tile, both ``[bq, bk]`` f32.

  ``lse2`` comes from backward_lse; ``delta`` is ``rowsum(do ⊙ o) − dlse``.
  """
  p = jnp.exp2(s - lse2[:, None])
  dp = dot_nt(do, v, precision)
  ds = p * (dp - delta[:, None])
  return p, ds
