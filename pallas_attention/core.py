"""The custom_vjp every implementation runs under.

The forward keeps only ``out`` and the log-sum-exp; the backward recomputes the
scores tile by tile from ``q, k, v, out, lse`` with the rowwise
``delta = rowsum(do ⊙ out)`` computed once up front.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_attention import tiles, xla
from pallas_attention.problem import Problem


def implementation_module(name: str):
  if name == "xla":
    return xla
  if name == "triton":
    from pallas_attention.triton import attention as triton_attention

    return triton_attention
  if name == "mosaic":
    from pallas_attention.mosaic import attention as mosaic_attention

    return mosaic_attention
  raise ValueError(f"implementation: unknown name {name!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(problem: Problem, q, k, v, bias, mask, q_len, kv_len):
  """``(out [B, T, N, H], lse [B, N, T])``, lse natural-log, -inf for empty rows."""
  return _attention_fwd(problem, q, k, v, bias, mask, q_len, kv_len)[0]


def _attention_fwd(problem, q, k, v, bias, mask, q_len, kv_len):
  out, lse2 = forward(problem, q, k, v, bias, mask, q_len, kv_len)
  residuals = (q, k, v, bias, mask, q_len, kv_len, out, lse2)
  return (out, lse2 * tiles.LN2), residuals


def _attention_bwd(problem, residuals, cotangents):
  q, k, v, bias, mask, q_len, kv_len, out, lse2 = residuals
  do, dlse = cotangents
  do = do.astype(q.dtype)
  # d lse / d logits = p, so an lse cotangent joins delta: ds = p (dp − δ + dlse).
  delta = row_delta(out, do) - dlse.astype(jnp.float32)
  dq, dk, dv, dbias = backward(problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta)
  return dq, dk, dv, dbias, None, None, None


def forward(problem: Problem, q, k, v, bias, mask, q_len, kv_len):
  """``(out, lse2)`` of one implementation, lse2 base-2; no custom_vjp around it.

  For callers that differentiate by a rule of their own (ring.py merges several).
  """
  return implementation_module(problem.implementation).forward(
    problem, q, k, v, bias, mask, q_len, kv_len
  )


def row_delta(out, do):
  """``rowsum(do ⊙ out)`` ``[B, N, T]`` f32, from ``out, do [B, T, N, H]``."""
  return jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))


def backward(problem: Problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
  """``dq, dk, dv, dbias`` (dbias None without a bias) from the forward's residuals.

  ``lse2`` is the base-2 LSE ``[B, N, T]`` and ``delta = rowsum(do ⊙ out) − dlse``.
  They may belong to a larger attention that this call is one block of (ring.py
  passes the merged LSE and output): the result is then this block's term, and the
  whole attention's ``dq`` is the sum over key blocks, its ``dk, dv`` the sum over
  query blocks.
  """
  args = (problem, q, k, v, bias, mask, q_len, kv_len, do, tiles.backward_lse(lse2), delta)
  dq, dk, dv = implementation_module(problem.implementation).backward(*args)
  dbias = None if bias is None else xla.bias_grad(*args).astype(bias.dtype)
  return dq, dk, dv, dbias


attention.defvjp(_attention_fwd, _attention_bwd)

attention_jit = jax.jit(attention, static_argnums=0)
