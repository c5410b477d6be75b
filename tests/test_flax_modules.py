"""pallas_attention.flax.linen / .nnx modules against Flax's own modules.

Same parameters, same inputs: outputs and gradients equal Flax's, except on query
rows that can attend to nothing (Flax averages the values there, we return zeros;
those rows are left out of every comparison). Options Flax's modules lack (window,
soft-cap, segment ids) are checked against Flax's modules given the equivalent dense
mask, or a dense attention function written here.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ON_GPU, normal, rel_err
from flax import linen as nn
from flax import nnx

from pallas_attention.flax import _attention, attention_fn
from pallas_attention.flax import linen as pl
from pallas_attention.flax import nnx as pn

# Float32: the Triton kernels take three TF32 passes a product on a GPU (about float32);
# XLA's products (projections, Flax's attention) run at full float32 precision here, see
# full_precision below.
TOL = 1e-4 if ON_GPU else 2e-5
B, T, S, F = 2, 16, 12, 32


@pytest.fixture(autouse=True)
def full_precision():
  """XLA's float32 products at full precision: on a GPU they default to one TF32 pass,
  whose error (about 1e-3) would hide ours."""
  with jax.default_matmul_precision("highest"):
    yield


def flat(tree) -> np.ndarray:
  """All leaves as one vector: some parameter gradients (the key bias) are zero in exact
  arithmetic, so per-leaf relative errors would compare rounding noise."""
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def band_mask(t, s, left, right, causal=False):
  """``[1, 1, t, s]`` float mask of the window, written independently of masks.py."""
  rows, cols = np.arange(t)[:, None], np.arange(s)[None, :]
  keep = (cols >= rows - left) & (cols <= rows + right)
  if causal:
    keep &= cols <= rows
  return jnp.asarray(keep[None, None], jnp.float32)


def soft_capped_attention(cap, query, key, value, mask=None, **_):
  """Dense soft-capped attention for Flax's attention_fn hook (mask required non-empty)."""
  logits = jnp.einsum("btnh,bsnh->bnts", query, key) / math.sqrt(query.shape[-1])
  logits = cap * jnp.tanh(logits / cap)
  if mask is not None:
    logits = jnp.where(mask != 0, logits, -1e30)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), value)


def padding(rng, batch, length, first_valid=True):
  valid = rng.random((batch, length)) < 0.7
  if first_valid:
    valid[:, 0] = True
  return jnp.asarray(valid)


# --- linen -------------------------------------------------------------------------------


def linen_compare(ours, ref, params, args, ours_kw, ref_kw, rows=None):
  """Outputs and gradients (params and inputs) of ``ours`` and ``ref`` agree.

  ``rows [B, T]``: query rows to compare (None: all).
  """
  weight = 1.0 if rows is None else rows[..., None].astype(jnp.float32)
  cotangent = weight * normal(np.random.default_rng(0), (*args[0].shape[:-1], F))

  @functools.partial(jax.jit, static_argnums=0)
  def out_and_grads(module, kw, params, args):
    out, vjp = jax.vjp(lambda p, a: module.apply(p, *a, **kw), params, args)
    return out, vjp(cotangent)

  got, got_grads = out_and_grads(ours, ours_kw, params, args)
  want, want_grads = out_and_grads(ref, ref_kw, params, args)
  assert got.shape == want.shape
  assert rel_err(weight * got, weight * want) < TOL
  assert rel_err(flat(got_grads), flat(want_grads)) < TOL


@pytest.mark.parametrize("cls_name", ["MultiHeadDotProductAttention", "MultiHeadAttention"])
def test_linen_parameter_tree_is_flax_and_checkpoints_load_both_ways(cls_name, rng):
  ours_cls, ref_cls = getattr(pl, cls_name), getattr(nn, cls_name)
  assert issubclass(ours_cls, ref_cls)

  class Model(nn.Module):  # auto-naming: ours must be named as Flax's layer would be
    cls: type

    @nn.compact
    def __call__(self, x):
      return self.cls(num_heads=4, qkv_features=16, out_features=24)(x)

  x = normal(rng, (B, T, F))
  ours, ref = Model(ours_cls), Model(ref_cls)
  ours_params, ref_params = ours.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
  assert jax.tree.structure(ours_params) == jax.tree.structure(ref_params)
  assert list(ours_params["params"]) == [f"{cls_name}_0"]
  for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(ref_params), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)  # same initializers, same RNG use
  # Each model's parameters run in the other (params made differently: key 2 vs 1).
  other = ref.init(jax.random.key(2), x)
  assert rel_err(ours.apply(other, x), ref.apply(other, x)) < TOL
  other = ours.init(jax.random.key(2), x)
  assert rel_err(ref.apply(other, x), ours.apply(other, x)) < TOL


def test_linen_self_attention_with_padding_matches_flax(rng):
  x = normal(rng, (B, T, F))
  ours, ref = pl.MultiHeadDotProductAttention(num_heads=4), nn.MultiHeadDotProductAttention(4)
  params = ref.init(jax.random.key(0), x)
  rows = padding(rng, B, T, first_valid=False)  # some rows attend to nothing
  mask = nn.make_attention_mask(rows, rows)
  linen_compare(ours, ref, params, (x,), dict(mask=mask), dict(mask=mask), rows)


def test_linen_cross_attention_with_padding_matches_flax(rng):
  xq, xkv = normal(rng, (B, T, F)), normal(rng, (B, S, 24))
  ours = pl.MultiHeadDotProductAttention(num_heads=2, qkv_features=32, out_features=F)
  ref = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=32, out_features=F)
  params = ref.init(jax.random.key(0), xq, xkv)
  q_valid, kv_valid = padding(rng, B, T, first_valid=False), padding(rng, B, S)
  mask = nn.make_attention_mask(q_valid, kv_valid)
  kw = dict(mask=mask)
  linen_compare(ours, ref, params, (xq, xkv), kw, kw, q_valid)


def test_linen_is_causal_combines_with_a_padding_mask(rng):
  x = normal(rng, (B, T, F))
  ours = pl.MultiHeadDotProductAttention(num_heads=4, is_causal=True)
  ref = nn.MultiHeadDotProductAttention(num_heads=4)
  params = ref.init(jax.random.key(0), x)
  valid = padding(rng, B, T)
  pad = nn.make_attention_mask(jnp.ones((B, T)), valid)
  causal = nn.make_causal_mask(jnp.ones((B, T)))
  linen_compare(ours, ref, params, (x,), dict(mask=pad), dict(mask=nn.combine_masks(pad, causal)))


# Window with is_causal: the decode tests (full pass against Flax with a causal band mask).
@pytest.mark.parametrize("window, causal", [((3, 2), False)])
def test_linen_local_window_matches_flax_with_a_band_mask(window, causal, rng):
  x = normal(rng, (B, T, F))
  ours = pl.MultiHeadDotProductAttention(num_heads=4, local_window_size=window, is_causal=causal)
  ref = nn.MultiHeadDotProductAttention(num_heads=4)
  params = ref.init(jax.random.key(0), x)
  left, right = (window, window) if isinstance(window, int) else window
  band = band_mask(T, T, T if left is None else left, right, causal)
  linen_compare(ours, ref, params, (x,), {}, dict(mask=band))


def test_linen_logits_soft_cap_matches_a_dense_reference(rng):
  x = normal(rng, (B, T, F), scale=3.0)  # large logits, so the cap matters
  cap = 2.0
  ours = pl.MultiHeadDotProductAttention(num_heads=4, logits_soft_cap=cap)
  ref = nn.MultiHeadDotProductAttention(
    num_heads=4, attention_fn=functools.partial(soft_capped_attention, cap)
  )
  uncapped = nn.MultiHeadDotProductAttention(num_heads=4)
  params = ref.init(jax.random.key(0), x)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the dense fallback's warning, while the core lacks it
    linen_compare(ours, ref, params, (x,), {}, {})
    assert rel_err(ours.apply(params, x), uncapped.apply(params, x)) > 1e-2


def test_linen_segment_ids_and_is_causal_match_flax_with_masks(rng):
  x = normal(rng, (B, T, F))
  ids = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
  ours = pl.MultiHeadDotProductAttention(num_heads=4, is_causal=True)
  ref = nn.MultiHeadDotProductAttention(num_heads=4)
  params = ref.init(jax.random.key(0), x)
  mask = nn.combine_masks(nn.make_attention_mask(ids, ids, jnp.equal), nn.make_causal_mask(ids))
  ours_kw = dict(q_segment_ids=ids, kv_segment_ids=ids)
  linen_compare(ours, ref, params, (x,), ours_kw, dict(mask=mask))


def test_linen_decode_matches_flax_decode_and_the_full_causal_pass(rng):
  x = normal(rng, (B, T, F))
  ref = nn.MultiHeadDotProductAttention(num_heads=4, decode=True)
  ours = pl.MultiHeadDotProductAttention(num_heads=4, decode=True, is_causal=True)
  variables = ref.init(jax.random.key(0), x)
  ours_variables = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(ours_variables) == jax.tree.structure(variables)
  params = variables["params"]

  def decoder(module):
    step = jax.jit(lambda cache, token: module.apply(params | cache, token, mutable=["cache"]))

    def run():
      cache, outs = {"cache": variables["cache"]}, []
      for i in range(T):
        out, cache = step(cache, x[:, i : i + 1])
        outs.append(out)
      assert int(cache["cache"]["cache_index"]) == T
      return jnp.concatenate(outs, axis=1)

    return run

  params = {"params": params}
  got, want = decoder(ours)(), decoder(ref)()
  assert rel_err(got, want) < TOL
  full = pl.MultiHeadDotProductAttention(num_heads=4, is_causal=True).apply(params, x)
  assert rel_err(got, full) < TOL


def test_linen_decode_with_window_and_soft_cap_matches_the_full_pass(rng):
  x = normal(rng, (B, T, F), scale=3.0)
  options = dict(num_heads=4, local_window_size=(3, 0), logits_soft_cap=2.0)
  decoder = pl.MultiHeadDotProductAttention(decode=True, **options)
  full = pl.MultiHeadDotProductAttention(is_causal=True, **options)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    variables = decoder.init(jax.random.key(0), x)
    cache, outs = {"cache": variables["cache"]}, []
    for i in range(T):
      out, cache = decoder.apply(
        {"params": variables["params"], **cache}, x[:, i : i + 1], mutable=["cache"]
      )
      outs.append(out)
    want = full.apply({"params": variables["params"]}, x)
  assert rel_err(jnp.concatenate(outs, axis=1), want) < TOL


def test_linen_scan_and_remat_match_flax(rng):
  class Block(nn.Module):
    attention: type
    causal_mask: bool

    @nn.compact
    def __call__(self, x, _):
      kw = dict(mask=nn.make_causal_mask(jnp.ones(x.shape[:-1]))) if self.causal_mask else {}
      options = {} if self.causal_mask else dict(is_causal=True)
      return x + self.attention(num_heads=4, **options)(nn.LayerNorm()(x), **kw), None

  def stack(attention, causal_mask):
    return nn.scan(
      nn.remat(Block),
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=3,
    )(attention, causal_mask)

  x = normal(rng, (B, T, F))
  ours = stack(pl.MultiHeadDotProductAttention, False)
  ref = stack(nn.MultiHeadDotProductAttention, True)
  params = ref.init(jax.random.key(0), x, None)
  assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(0), x, None))

  def loss(module):
    def fn(p, x):
      out = module.apply(p, x, None)[0]
      return jnp.sum(jnp.sin(out)), out

    return jax.value_and_grad(fn, (0, 1), has_aux=True)

  (_, got), got_grads = jax.jit(loss(ours))(params, x)
  (_, want), want_grads = loss(ref)(params, x)
  assert rel_err(got, want) < TOL
  assert rel_err(flat(got_grads), flat(want_grads)) < TOL


def test_linen_dropout_in_training_falls_back_with_the_options_as_a_mask(rng):
  x = normal(rng, (B, T, F))
  options = dict(num_heads=4, dropout_rate=0.3, deterministic=False)
  ours = pl.MultiHeadDotProductAttention(is_causal=True, local_window_size=(2, 0), **options)
  ref = nn.MultiHeadDotProductAttention(**options)
  params = ref.init(jax.random.key(0), x)
  rng_key = jax.random.key(5)
  with pytest.warns(UserWarning, match="dropout"):
    got = ours.apply(params, x, dropout_rng=rng_key)
  want = ref.apply(params, x, mask=band_mask(T, T, 2, 0), dropout_rng=rng_key)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_linen_options_need_our_attention_fn(rng):
  x = normal(rng, (B, T, F))
  foreign = pl.MultiHeadDotProductAttention(
    num_heads=4, is_causal=True, attention_fn=nn.dot_product_attention
  )
  with pytest.raises(ValueError, match="is_causal"):
    foreign.init(jax.random.key(0), x)
  ids = jnp.zeros((B, T), jnp.int32)
  plain = pl.MultiHeadDotProductAttention(num_heads=4, attention_fn=nn.dot_product_attention)
  params = plain.init(jax.random.key(0), x)  # no options: any attention_fn works
  with pytest.raises(ValueError, match="q_segment_ids"):
    plain.apply(params, x, q_segment_ids=ids, kv_segment_ids=ids)
  # A partial of ours still reads the module's options.
  bound = pl.MultiHeadDotProductAttention(
    num_heads=4, is_causal=True, attention_fn=functools.partial(attention_fn, implementation="xla")
  )
  want = nn.MultiHeadDotProductAttention(num_heads=4).apply(
    params, x, mask=nn.make_causal_mask(jnp.ones((B, T)))
  )
  assert rel_err(bound.apply(params, x), want) < TOL


def test_linen_bad_option_combinations_raise(rng):
  x = normal(rng, (B, T, F))
  layer = pl.MultiHeadDotProductAttention(num_heads=4)
  params = layer.init(jax.random.key(0), x)
  ids = jnp.zeros((B, T), jnp.int32)
  with pytest.raises(ValueError, match="both or neither"):
    layer.apply(params, x, q_segment_ids=ids)
  with pytest.raises(ValueError, match="kv_segment_ids: expected shape"):
    layer.apply(params, x, q_segment_ids=ids, kv_segment_ids=ids[:, :-1])
  with pytest.raises(TypeError, match="q_segment_ids: expected an integer"):
    layer.apply(params, x, q_segment_ids=ids * 1.0, kv_segment_ids=ids)
  capped = pl.MultiHeadDotProductAttention(num_heads=4, logits_soft_cap=1.0)
  with pytest.raises(NotImplementedError, match="logits_soft_cap"):
    capped.apply(params, x, sow_weights=True, mutable=["intermediates"])
  with pytest.raises(ValueError, match="logits_soft_cap"):
    pl.MultiHeadDotProductAttention(num_heads=4, logits_soft_cap=-1.0).apply(params, x)
  with pytest.raises(ValueError, match="implementation"):
    pl.MultiHeadDotProductAttention(num_heads=4, implementation="cuda").apply(params, x)


# --- nnx ---------------------------------------------------------------------------------


def nnx_pair(ref_attention_fn=nnx.dot_product_attention, **kw):
  """Ours and Flax's module with the same state; options only Flax's lacks go to ours."""
  kw = dict(num_heads=4, in_features=F, decode=False, rngs=nnx.Rngs(0)) | kw
  ours_kw = {k: kw.pop(k) for k in ("is_causal", "local_window_size", "logits_soft_cap") if k in kw}
  ref = nnx.MultiHeadAttention(**kw, attention_fn=ref_attention_fn)
  ours = pn.MultiHeadAttention(**(kw | dict(rngs=nnx.Rngs(1))), **ours_kw)
  nnx.update(ours, nnx.state(ref))
  return ours, ref


def nnx_compare(ours, ref, args, ours_kw, ref_kw, rows=None):
  """As linen_compare, through nnx.jit and nnx.value_and_grad."""
  weight = 1.0 if rows is None else rows[..., None].astype(jnp.float32)
  cotangent = weight * normal(np.random.default_rng(0), (*args[0].shape[:-1], ref.out_features))

  def out_and_grads(model, kw):
    def loss(model, args):
      out = model(*args, **kw)
      return jnp.sum(out * cotangent), out

    grad_fn = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return nnx.jit(grad_fn)(model, args)

  (_, got), got_grads = out_and_grads(ours, ours_kw)
  (_, want), want_grads = out_and_grads(ref, ref_kw)
  assert rel_err(weight * got, weight * want) < TOL
  assert rel_err(flat(got_grads), flat(want_grads)) < TOL


def test_nnx_state_is_flax_and_loads_both_ways(rng):
  x = normal(rng, (B, T, F))
  ours, ref = nnx_pair(num_kv_heads=2, normalize_qk=True)
  assert isinstance(ours, nnx.MultiHeadAttention)
  ours_state, ref_state = nnx.state(ours), nnx.state(ref)
  assert jax.tree.structure(ours_state) == jax.tree.structure(ref_state)
  assert [a.shape for a in jax.tree.leaves(ours_state)] == [
    a.shape for a in jax.tree.leaves(ref_state)
  ]
  fresh = pn.MultiHeadAttention(4, F, num_kv_heads=2, normalize_qk=True, rngs=nnx.Rngs(7))
  assert rel_err(fresh(x, decode=False), ours(x)) > 1e-2
  nnx.update(ref, nnx.state(fresh))  # ours -> Flax's
  assert rel_err(ref(x), fresh(x, decode=False)) < TOL


@pytest.mark.parametrize("kv_heads, masking", [(2, "padding"), (1, "causal")])
def test_nnx_self_attention_matches_flax(kv_heads, masking, rng):
  x = normal(rng, (B, T, F))
  ours, ref = nnx_pair(num_kv_heads=kv_heads)
  rows = None
  if masking == "causal":
    mask = nn.make_causal_mask(jnp.ones((B, T)))
  else:
    rows = padding(rng, B, T, first_valid=False)
    mask = nn.make_attention_mask(rows, rows)
  nnx_compare(ours, ref, (x,), dict(mask=mask), dict(mask=mask), rows)


def test_nnx_cross_attention_matches_flax(rng):
  xq, xkv = normal(rng, (B, T, F)), normal(rng, (B, S, 24))
  ours, ref = nnx_pair(in_kv_features=24, qkv_features=16, out_features=8, num_kv_heads=2)
  kv_valid = padding(rng, B, S)
  mask = nn.make_attention_mask(jnp.ones((B, T)), kv_valid)
  nnx_compare(ours, ref, (xq, xkv), dict(mask=mask), dict(mask=mask))


def test_nnx_is_causal_option_and_call_argument(rng):
  x = normal(rng, (B, T, F))
  ours, ref = nnx_pair(is_causal=True, num_kv_heads=2)
  valid = padding(rng, B, T)
  pad = nn.make_attention_mask(jnp.ones((B, T)), valid)
  causal = nn.make_causal_mask(jnp.ones((B, T)))
  nnx_compare(ours, ref, (x,), {}, dict(mask=causal))
  nnx_compare(ours, ref, (x,), dict(mask=pad), dict(mask=pad, is_causal=True))


def test_nnx_window_soft_cap_and_segment_ids(rng):
  x = normal(rng, (B, T, F), scale=3.0)
  ids = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
  segments = nn.make_attention_mask(ids, ids, jnp.equal)
  band = band_mask(T, T, 3, 1)
  ours, ref = nnx_pair(local_window_size=(3, 1))
  both = nn.combine_masks(jnp.broadcast_to(band, segments.shape), segments)
  nnx_compare(ours, ref, (x,), dict(q_segment_ids=ids, kv_segment_ids=ids), dict(mask=both))
  capped = functools.partial(soft_capped_attention, 2.0)
  ours, ref = nnx_pair(logits_soft_cap=2.0, ref_attention_fn=capped)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    nnx_compare(ours, ref, (x,), dict(is_causal=True), dict(mask=nn.make_causal_mask(ids)))


def test_nnx_decode_with_gqa_matches_flax_decode_and_the_full_pass(rng):
  x = normal(rng, (B, T, F))
  ours, ref = nnx_pair(num_kv_heads=2, decode=True)
  for model in (ours, ref):
    model.init_cache((B, T, F))

  @nnx.jit
  def step(model, token):
    return model(token)

  got = jnp.concatenate([step(ours, x[:, i : i + 1]) for i in range(T)], axis=1)
  want = jnp.concatenate([step(ref, x[:, i : i + 1]) for i in range(T)], axis=1)
  assert int(ours.cache_index[...]) == T
  assert rel_err(got, want) < TOL
  assert rel_err(got, ours(x, decode=False, is_causal=True)) < TOL


def test_nnx_decode_with_window_matches_the_full_pass(rng):
  x = normal(rng, (B, T, F))
  ours, _ = nnx_pair(num_kv_heads=2, decode=True, local_window_size=(2, 0))
  ours.init_cache((B, T, F))
  got = jnp.concatenate([ours(x[:, i : i + 1]) for i in range(T)], axis=1)
  assert rel_err(got, ours(x, decode=False, is_causal=True)) < TOL
  _, ref = nnx_pair(num_kv_heads=2)
  nnx.update(ref, nnx.state(ours, nnx.Param))
  assert rel_err(got, ref(x, mask=band_mask(T, T, 2, 0, causal=True))) < TOL


def test_nnx_training_step_matches_flax(rng):
  x, target = normal(rng, (B, T, F)), normal(rng, (B, T, F))
  ours, ref = nnx_pair(num_kv_heads=2, is_causal=True)
  causal = nn.make_causal_mask(jnp.ones((B, T)))

  def train(model, kw, steps=3):
    @nnx.jit
    def step(model):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x, **kw) - target) ** 2))(model)
      params = nnx.state(model, nnx.Param)
      nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
      return loss

    return [float(step(model)) for _ in range(steps)]

  got, want = train(ours, {}), train(ref, dict(mask=causal))
  np.testing.assert_allclose(got, want, rtol=TOL)
  assert got[-1] < got[0]
  assert rel_err(flat(nnx.state(ours, nnx.Param)), flat(nnx.state(ref, nnx.Param))) < TOL


# --- attention_fn's own paths ------------------------------------------------------------


def test_attention_fn_soft_cap_against_float64_reference(rng):
  q, k, v = (normal(rng, (B, length, 4, 16), scale=2.0) for length in (T, S, S))
  k, v = k[:, :, :2], v[:, :, :2]  # GQA
  cap, window = 1.5, (4, 2)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = attention_fn(q, k, v, logits_soft_cap=cap, local_window_size=window, is_causal=True)
  if not _attention._flash_attention_accepts("logits_soft_cap"):
    assert any("dense" in str(w.message) for w in caught)
  rows, cols = np.arange(T)[:, None], np.arange(S)[None, :]
  keep = (cols >= rows - 4) & (cols <= rows + 2) & (cols <= rows)
  q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
  k64, v64 = np.repeat(k64, 2, axis=2), np.repeat(v64, 2, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q64, k64) / 4.0
  logits = np.where(keep, cap * np.tanh(logits / cap), -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bnts,bsnh->btnh", probs / probs.sum(-1, keepdims=True), v64)
  assert rel_err(got, want) < TOL


def test_attention_fn_passes_options_to_flash_attention_once_it_takes_them(monkeypatch, rng):
  q = normal(rng, (B, T, 4, 16))
  ids = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.int32)
  calls = []

  def spy(query, key, value, bias=None, mask=None, **kwargs):
    calls.append((mask, kwargs))
    return jnp.zeros_like(query)

  monkeypatch.setattr(_attention, "flash_attention", spy)
  options = dict(q_segment_ids=ids, kv_segment_ids=ids, logits_soft_cap=1.0)
  monkeypatch.setattr(_attention, "_flash_attention_accepts", lambda option: True)
  attention_fn(q, q, q, **options)
  mask, kwargs = calls.pop()
  assert mask is None and kwargs["logits_soft_cap"] == 1.0
  np.testing.assert_array_equal(kwargs["q_segment_ids"], ids)
  # While flash_attention lacks them: segment ids as a mask, soft-cap not on this path.
  monkeypatch.setattr(_attention, "_flash_attention_accepts", lambda option: False)
  attention_fn(q, q, q, q_segment_ids=ids, kv_segment_ids=ids)
  mask, kwargs = calls.pop()
  assert "q_segment_ids" not in kwargs and mask.shape == (B, 1, T, T)
  np.testing.assert_array_equal(mask[:, 0], ids[:, :, None] == ids[:, None, :])
  with pytest.warns(UserWarning, match="dense"):
    attention_fn(q, q, q, logits_soft_cap=1.0)
  assert not calls
