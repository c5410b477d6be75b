"""The public contract: argument checks, dispatch, shapes, and JAX transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMPLEMENTATIONS, ON_GPU, normal, rel_err

from pallas_attention import core, flash_attention


@pytest.fixture
def qkv(rng):
  return normal(rng, (2, 40, 4, 32)), normal(rng, (2, 50, 2, 32)), normal(rng, (2, 50, 2, 32))


BAD_CALLS = [
  # (description, how to change the call, exception, text the message must contain)
  ("query rank 2", lambda q, k, v: ((q[0, :, 0], k, v), {}), ValueError, "query"),
  ("key rank differs", lambda q, k, v: ((q, k[0], v), {}), ValueError, "key"),
  ("value shape differs", lambda q, k, v: ((q, k, v[:, :10]), {}), ValueError, "value"),
  ("head dim differs", lambda q, k, v: ((q, k[..., :16], v[..., :16]), {}), ValueError, "head dim"),
  ("batch differs", lambda q, k, v: ((q, k[:1], v[:1]), {}), ValueError, "batch"),
  ("N % K", lambda q, k, v: ((q[:, :, :3], k, v), {}), ValueError, "multiple"),
  ("integer query", lambda q, k, v: ((q.astype(jnp.int32), k, v), {}), TypeError, "query"),
  ("dtype mix", lambda q, k, v: ((q, k.astype(jnp.bfloat16), v), {}), TypeError, "key"),
  ("mask not bool", lambda q, k, v: ((q, k, v, None, jnp.ones((40, 50))), {}), TypeError, "mask"),
  (
    "mask shape",
    lambda q, k, v: ((q, k, v, None, jnp.ones((2, 4, 41, 50), bool)), {}),
    ValueError,
    "mask",
  ),
  ("bias shape", lambda q, k, v: ((q, k, v, jnp.ones((3, 1, 1, 50))), {}), ValueError, "bias"),
  ("bias rank 5", lambda q, k, v: ((q, k, v, jnp.ones((1, 2, 4, 40, 50))), {}), ValueError, "bias"),
  (
    "bias integer",
    lambda q, k, v: ((q, k, v, jnp.ones((40, 50), jnp.int32)), {}),
    TypeError,
    "bias",
  ),
  (
    "lengths shape",
    lambda q, k, v: ((q, k, v), dict(query_seq_lengths=jnp.array([3]))),
    ValueError,
    "query_seq_lengths",
  ),
  (
    "lengths dtype",
    lambda q, k, v: ((q, k, v), dict(key_value_seq_lengths=jnp.ones(2))),
    TypeError,
    "key_value_seq_lengths",
  ),
  (
    "window negative",
    lambda q, k, v: ((q, k, v), dict(local_window_size=(-1, 3))),
    ValueError,
    "local_window_size",
  ),
  (
    "window type",
    lambda q, k, v: ((q, k, v), dict(local_window_size=(1, 2, 3))),
    TypeError,
    "local_window_size",
  ),
  (
    "window float",
    lambda q, k, v: ((q, k, v), dict(local_window_size=2.5)),
    TypeError,
    "local_window_size",
  ),
  (
    "unknown implementation",
    lambda q, k, v: ((q, k, v), dict(implementation="cuda")),
    ValueError,
    "implementation",
  ),
  (
    "empty implementation list",
    lambda q, k, v: ((q, k, v), dict(implementation=[])),
    ValueError,
    "implementation",
  ),
  ("scale not a number", lambda q, k, v: ((q, k, v), dict(scale="big")), TypeError, "scale"),
  (
    "deterministic_backward not a bool",
    lambda q, k, v: ((q, k, v), dict(deterministic_backward="no")),
    TypeError,
    "deterministic_backward",
  ),
]


@pytest.mark.parametrize(
  "change,error,text", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_input(qkv, change, error, text):
  args, kwargs = change(*qkv)
  before = core.attention_jit._cache_size()
  with pytest.raises(error, match=text):
    flash_attention(*args, **kwargs)
  # Rejected before anything was traced or compiled.
  assert core.attention_jit._cache_size() == before


def test_traced_scale_rejected(qkv):
  with pytest.raises(TypeError, match="scale"):
    jax.jit(lambda q, k, v, s: flash_attention(q, k, v, scale=s))(*qkv, 0.5)


@pytest.mark.parametrize(
  "option",
  [
    dict(q_segment_ids=jnp.zeros((2, 40), jnp.int32)),
    dict(logits_soft_cap=30.0),
    dict(alibi_slopes=jnp.ones(4)),
    dict(sink_logits=jnp.zeros(4)),
    dict(block_mask=jnp.ones((1, 1, 1, 1), bool)),
    dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
  ],
  ids=lambda o: next(iter(o)),
)
def test_variants_not_implemented_yet(qkv, option):
  with pytest.raises(NotImplementedError, match=next(iter(option))):
    flash_attention(*qkv, **option)


def test_mosaic_rejects_what_it_does_not_serve(qkv):
  q, k, v = qkv  # float32
  with pytest.raises(NotImplementedError, match="mosaic: dtype float32"):
    flash_attention(q, k, v, implementation="mosaic")
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv)
  with pytest.raises(NotImplementedError, match="mosaic: bias"):
    flash_attention(q, k, v, jnp.zeros((1, 1, 1, 50)), implementation="mosaic")
  with pytest.raises(NotImplementedError, match="mosaic: per-batch sequence lengths"):
    flash_attention(q, k, v, key_value_seq_lengths=jnp.array([3, 50]), implementation="mosaic")


def test_sequence_falls_through(qkv):
  expected = flash_attention(*qkv, implementation="xla")
  got = flash_attention(*qkv, implementation=("mosaic", "xla"))
  np.testing.assert_array_equal(got, expected)


def test_triton_head_dim_limit_falls_back(rng):
  q = normal(rng, (1, 20, 1, 320))
  with pytest.raises(NotImplementedError, match="head dim"):
    flash_attention(q, q, q, implementation="triton")
  out = flash_attention(q, q, q, implementation=["triton", "xla"])
  assert out.shape == q.shape


def test_default_on_cpu_is_xla(qkv):
  if jax.default_backend() != "cpu":
    pytest.skip("CPU dispatch")
  np.testing.assert_array_equal(flash_attention(*qkv), flash_attention(*qkv, implementation="xla"))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_unbatched(qkv, implementation):
  q, k, v = qkv
  bias = jnp.ones((4, 40, 50)) * 0.1
  out, lse = flash_attention(
    q[0], k[0], v[0], bias, is_causal=True, return_residual=True, implementation=implementation
  )
  ref, ref_lse = flash_attention(
    q[:1],
    k[:1],
    v[:1],
    bias[None],
    is_causal=True,
    return_residual=True,
    implementation=implementation,
  )
  assert out.shape == q.shape[1:] and lse.shape == (4, 40)
  np.testing.assert_allclose(out, ref[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse, ref_lse[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "mosaic"])
def test_jit_vmap_grad_checkpoint(qkv, implementation):
  q, k, v = qkv
  if implementation == "mosaic":  # 16-bit floats only
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv)
  call = lambda q, k, v: flash_attention(q, k, v, is_causal=True, implementation=implementation)
  eager = call(q, k, v)
  np.testing.assert_allclose(jax.jit(call)(q, k, v), eager, rtol=1e-6, atol=1e-6)
  # vmap over the batch: each call sees unbatched [T, N, H] inputs.
  np.testing.assert_allclose(jax.vmap(call)(q, k, v), eager, rtol=1e-5, atol=1e-5)

  loss = lambda q, k, v: jnp.sum(jnp.sin(call(q, k, v)))
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  vmapped = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(q[:, None], k[:, None], v[:, None])
  for g, vm in zip(grads, vmapped, strict=True):
    assert rel_err(vm[:, 0], g) < 1e-5
  if implementation == "mosaic" and not ON_GPU:
    return  # the interpreter's kernels carry IO effects, which jax.checkpoint rejects
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(grads, remat, strict=True):
    assert rel_err(r, g) < 1e-5


def test_compiles_once_per_static_configuration(rng):
  shape = (1, 33, 2, 16)
  q, k, v = (normal(rng, shape) for _ in range(3))
  flash_attention(q, k, v, implementation="xla")
  size = core.attention_jit._cache_size()
  flash_attention(q * 2, k + 1, v, implementation="xla")  # new values, same shapes
  assert core.attention_jit._cache_size() == size
  flash_attention(q, k, v, is_causal=True, implementation="xla")  # new static option
  assert core.attention_jit._cache_size() == size + 1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_memory_linear_in_length(implementation):
  """Doubling T = S doubles forward+backward scratch memory, not quadruples it.

  Compiled, not run: XLA's buffer assignment gives the scratch bytes.
  """

  def temp_bytes(attn, t):
    x = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)), argnums=(0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  ours = lambda q, k, v: flash_attention(q, k, v, implementation=implementation)
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  t = 4096
  assert temp_bytes(dense, 2 * t) >= 3.5 * temp_bytes(dense, t)  # the dense path is quadratic
  assert temp_bytes(ours, 2 * t) <= 2.5 * temp_bytes(ours, t)
  assert temp_bytes(ours, 2 * t) < (2 * t) ** 2 * 4  # less than one float32 score matrix
