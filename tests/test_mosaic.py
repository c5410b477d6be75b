"""The Mosaic GPU forward kernel (groundwork, not dispatched yet) against the reference.

On CPU it runs in the Mosaic GPU interpreter; on the GPU machine, compiled.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal, reference_with_grads, rel_err

from pallas_attention.mosaic import attention as mosaic
from pallas_attention.tiles import LN2


@pytest.mark.parametrize(
  "batch,t,heads,kv_heads,head_dim,causal",
  [(1, 256, 2, 1, 64, False), (1, 256, 2, 1, 64, True), (2, 192, 2, 2, 128, True)],
)
def test_forward_matches_reference(batch, t, heads, kv_heads, head_dim, causal, rng):
  q = normal(rng, (batch, t, heads, head_dim), jnp.bfloat16)
  k, v = (normal(rng, (batch, t, kv_heads, head_dim), jnp.bfloat16) for _ in range(2))
  ref_out, ref_lse, _ = reference_with_grads(q, k, v, q, is_causal=causal)
  out, lse2 = mosaic.forward_jit(q, k, v, scale=1 / math.sqrt(head_dim), causal=causal)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert rel_err(out, ref_out) < 2e-2
  assert rel_err(np.asarray(lse2) * LN2, ref_lse) < 2e-2


def test_unsupported_shapes_raise(rng):
  q = normal(rng, (1, 100, 1, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="multiples"):
    mosaic.forward(q, q, q, scale=0.125)
  q32 = normal(rng, (1, 128, 1, 64))
  with pytest.raises(NotImplementedError, match="dtype"):
    mosaic.forward(q32, q32, q32, scale=0.125)
