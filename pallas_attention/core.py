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
  out, lse2 = implementation_module(problem.implementation).forward(
    problem, q, k, v, bias, mask, q_len, kv_len
  )
  residuals = (q, k, v, bias, mask, q_len, kv_len, out, lse2)
  return (out, lse2 * tiles.LN2), residuals


def _attention_bwd(problem, residuals, cotangents):
  q, k, v, bias, mask, q_len, kv_len, out, lse2 = residuals
  do, dlse = cotangents
  do = do.astype(q.dtype)
  # d lse / d logits = p, so an lse cotangent joins delta: ds = p (dp − δ + dlse).
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
  delta = delta - dlse.astype(jnp.float32)
  lse2 = tiles.backward_lse(lse2)
  args = (problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta)
  dq, dk, dv = implementation_module(problem.implementation).backward(*args)
  dbias = None if bias is None else xla.bias_grad(*args).astype(bias.dtype)
  return dq, dk, dv, dbias, None, None, None


attention.defvjp(_attention_fwd, _attention_bwd)

attention_jit = jax.jit(attention, static_argnums=0)
