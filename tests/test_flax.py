"""pallas_attention.flax.attention_fn against Flax's own attention (linen and NNX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ON_GPU, normal, rel_err
from flax import linen as nn
from flax import nnx

from pallas_attention.flax import attention_fn

# Float32 on a GPU: the Triton kernels and XLA's products use TF32 passes.
TOL = 2e-3 if ON_GPU else 2e-5


def _qkv(rng, batch=(2,), t=24, s=24, n=4, h=16):
  return tuple(normal(rng, (*batch, length, n, h)) for length in (t, s, s))


@pytest.mark.parametrize("batch", [(2,), (2, 3), ()])
def test_matches_linen_function_with_float_masks(batch, rng):
  q, k, v = _qkv(rng, batch, t=20, s=28)
  pad = jnp.asarray(rng.random((*batch, 28)) < 0.8).at[..., 0].set(True)
  # Flax's mask helpers return float32 masks; the hook must read them as bool.
  mask = nn.make_attention_mask(jnp.ones((*batch, 20)), pad)
  assert mask.dtype == jnp.float32
  bias = normal(rng, (1,) * min(len(batch), 1) + (4, 20, 28))
  got = attention_fn(q, k, v, bias, mask)
  want = nn.dot_product_attention(q, k, v, bias, mask)
  assert got.shape == want.shape
  assert rel_err(got, want) < TOL


def test_gradients_match_linen_function(rng):
  q, k, v = _qkv(rng)
  mask = nn.make_causal_mask(jnp.ones((2, 24)))

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask=mask)))

  ours = jax.grad(loss(attention_fn), argnums=(0, 1, 2))(q, k, v)
  theirs = jax.grad(loss(nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, theirs, strict=True):
    assert rel_err(a, b) < TOL


def test_linen_module_drop_in(rng):
  x = normal(rng, (2, 24, 32))
  ref = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, attention_fn=attention_fn)
  mask = nn.make_causal_mask(jnp.ones((2, 24)))
  params = ref.init(jax.random.key(0), x, mask=mask)
  # Same parameter tree: a checkpoint of one loads into the other.
  assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(0), x))
  want = ref.apply(params, x, mask=mask)
  got = ours.apply(params, x, mask=mask)
  assert rel_err(got, want) < TOL

  def loss(module):
    return lambda p: jnp.sum(module.apply(p, x, mask=mask) ** 2)

  # All parameter gradients as one vector: the key-projection bias has a gradient
  # that is exactly zero in exact arithmetic (softmax ignores a per-row shift), so
  # per-leaf relative errors would compare rounding noise with rounding noise.
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
  assert rel_err(flat(jax.grad(loss(ours))(params)), flat(jax.grad(loss(ref))(params))) < TOL


def test_nnx_module_drop_in_with_is_causal(rng):
  x = normal(rng, (2, 24, 32))
  make = lambda fn: nnx.MultiHeadAttention(  # noqa: E731
    num_heads=4, in_features=32, decode=False, rngs=nnx.Rngs(0), attention_fn=fn
  )
  ref, ours = make(nnx.dot_product_attention), make(attention_fn)
  nnx.update(ours, nnx.state(ref))
  mask = nn.make_causal_mask(jnp.ones((2, 24)))
  assert rel_err(ours(x, mask=mask), ref(x, mask=mask)) < TOL
  # NNX passes is_causal: the kernels' causal path, no mask array.
  assert rel_err(ours(x, is_causal=True), ref(x, mask=mask)) < TOL


def test_dropout_and_sown_weights_fall_back_to_flax(rng):
  q, k, v = _qkv(rng)
  rng_key = jax.random.key(3)
  with pytest.warns(UserWarning, match="dropout"):
    got = attention_fn(q, k, v, dropout_rate=0.5, dropout_rng=rng_key, deterministic=False)
  want = nn.dot_product_attention(
    q, k, v, dropout_rate=0.5, dropout_rng=rng_key, deterministic=False
  )
  np.testing.assert_array_equal(got, want)
  # Deterministic calls with a dropout rate (evaluation) stay on flash attention.
  got = attention_fn(q, k, v, dropout_rate=0.5, deterministic=True)
  assert rel_err(got, nn.dot_product_attention(q, k, v)) < TOL

  x = normal(rng, (2, 24, 32))
  layer = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=attention_fn)
  params = layer.init(jax.random.key(0), x)
  with pytest.warns(UserWarning, match="sown"):
    _, state = layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
  assert "attention_weights" in state["intermediates"]


def test_dtype_casts_inputs(rng):
  q, k, v = _qkv(rng)
  got = attention_fn(q, k, v, dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, nn.dot_product_attention(q, k, v)) < 2e-2


def test_deterministic_backward_reaches_flash_attention(rng, monkeypatch):
  """``functools.partial(attention_fn, deterministic_backward=False)`` as a module's
  attention_fn: the option reaches flash_attention, and the result is unchanged."""
  import functools

  from pallas_attention.flax import _attention

  seen = []
  real = _attention.flash_attention

  def spy(*args, **kwargs):
    seen.append(kwargs.get("deterministic_backward"))
    return real(*args, **kwargs)

  monkeypatch.setattr(_attention, "flash_attention", spy)
  x = normal(rng, (2, 24, 32))
  fn = functools.partial(attention_fn, deterministic_backward=False)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, attention_fn=fn)
  ref = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
  params = ref.init(jax.random.key(0), x)
  assert rel_err(ours.apply(params, x), ref.apply(params, x)) < TOL
  assert seen == [False]
