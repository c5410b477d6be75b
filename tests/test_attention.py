"""flash_attention against the dense float64 reference: outputs, LSE and gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMPLEMENTATIONS, ON_GPU, TOLERANCE, normal, reference_with_grads, rel_err

from pallas_attention import flash_attention


@dataclasses.dataclass
class Case:
  name: str
  batch: int = 2
  t: int = 256
  s: int = 256
  heads: int = 2
  kv_heads: int = 2
  head_dim: int = 64
  dtype: object = jnp.float32
  input_scale: float = 1.0
  options: dict = dataclasses.field(default_factory=dict)
  bias_shape: tuple | None = None  # in [B, N, T, S] terms; 1 = broadcast
  mask_shape: tuple | None = None
  mask_empty_rows: bool = False  # also give some rows nothing to attend to

  def __str__(self):
    return self.name


CASES = [
  Case("plain"),
  Case("causal", options=dict(is_causal=True)),
  Case("odd_lengths_causal", t=203, s=203, options=dict(is_causal=True)),
  Case("t_lt_s", t=100, s=300),
  Case("t_gt_s_causal", t=300, s=130, options=dict(is_causal=True)),
  Case("gqa", heads=6, kv_heads=2, t=190, s=260),
  Case("mqa_causal", heads=4, kv_heads=1, options=dict(is_causal=True)),
  Case("head_dim_32", head_dim=32, t=150, s=170),
  Case("head_dim_40", head_dim=40, t=130, s=200),
  Case("head_dim_128", head_dim=128, t=160, s=200, options=dict(is_causal=True)),
  Case("head_dim_256", head_dim=256, batch=1, t=130, s=150),
  Case("window", t=300, s=300, options=dict(local_window_size=(40, 7))),
  Case("window_int_causal", t=257, s=257, options=dict(local_window_size=33, is_causal=True)),
  Case("window_left_only", t=280, s=280, options=dict(local_window_size=(50, None))),
  Case(
    "lengths",
    t=200,
    s=310,
    options=dict(query_seq_lengths=[150, 7], key_value_seq_lengths=[300, 65]),
  ),
  Case(
    "lengths_causal_gqa",
    heads=4,
    kv_heads=2,
    t=250,
    s=250,
    options=dict(is_causal=True, query_seq_lengths=[250, 90], key_value_seq_lengths=[120, 250]),
  ),
  Case("bias_full", t=140, s=190, bias_shape=(2, 2, 140, 190)),
  Case("bias_key_padding", heads=4, kv_heads=2, t=150, s=200, bias_shape=(2, 1, 1, 200)),
  Case(
    "bias_per_head_causal", t=170, s=170, bias_shape=(1, 2, 170, 170), options=dict(is_causal=True)
  ),
  Case("mask_dense", t=150, s=210, mask_shape=(2, 1, 150, 210)),
  Case("mask_rows_empty", t=140, s=180, mask_shape=(2, 2, 140, 180), mask_empty_rows=True),
  Case(
    "mask_key_only_window",
    t=200,
    s=200,
    mask_shape=(2, 1, 1, 200),
    options=dict(local_window_size=(20, 20)),
  ),
  Case("large_logits", input_scale=8.0, t=200, s=230),
  Case("empty_rows_window", t=260, s=100, options=dict(local_window_size=(0, 0))),
  Case("bf16_causal", dtype=jnp.bfloat16, t=300, s=300, options=dict(is_causal=True)),
  Case("f16_gqa", dtype=jnp.float16, batch=1, heads=4, kv_heads=2, t=200, s=240),
  Case(
    "bf16_bias_lengths",
    dtype=jnp.bfloat16,
    t=180,
    s=220,
    bias_shape=(2, 2, 1, 220),
    options=dict(key_value_seq_lengths=[220, 31]),
  ),
]


def _inputs(case: Case, rng):
  q = normal(rng, (case.batch, case.t, case.heads, case.head_dim), case.dtype, case.input_scale)
  k = normal(rng, (case.batch, case.s, case.kv_heads, case.head_dim), case.dtype, case.input_scale)
  v = normal(rng, (case.batch, case.s, case.kv_heads, case.head_dim), case.dtype)
  cotangent = normal(rng, q.shape, case.dtype)
  bias = None if case.bias_shape is None else normal(rng, case.bias_shape, case.dtype)
  mask = None
  if case.mask_shape is not None:
    mask = rng.random(case.mask_shape) < 0.7
    if case.mask_empty_rows:
      mask[:, :, ::7, :] = False
    mask = jnp.asarray(mask)
  options = dict(case.options)
  for name in ("query_seq_lengths", "key_value_seq_lengths"):
    if name in options:
      options[name] = jnp.asarray(options[name], jnp.int32)
  return q, k, v, cotangent, bias, mask, options


# Cases the mosaic kernels run in the CPU interpreter (each takes seconds there);
# on the GPU every case runs for mosaic. Not bf16_causal: mosaic runs float32 inputs in
# bfloat16, so on CPU it would repeat "causal" at a larger shape.
MOSAIC_ON_CPU = {
  "plain",
  "causal",
  "odd_lengths_causal",
  "t_gt_s_causal",
  "gqa",
  "head_dim_40",
  "window",
  "empty_rows_window",
  "f16_gqa",
  "lengths",
  "bias_full",
}


def _mosaic_case(case: Case) -> Case | None:
  """The case as the mosaic kernels see it: float32 runs in bfloat16 (they serve
  only 16-bit floats); None where they do not serve the call (bias, mask,
  per-batch lengths), which the test checks falls through to triton instead."""
  if not ON_GPU and case.name not in MOSAIC_ON_CPU:
    pytest.skip("mosaic runs this case on the GPU only (interpreter time)")
  served = case.bias_shape is None and case.mask_shape is None
  served = served and not any("lengths" in name for name in case.options)
  if not served:
    return None
  if case.dtype == jnp.float32:
    return dataclasses.replace(case, dtype=jnp.bfloat16)
  return case


# deterministic_backward=False: mosaic's fused backward (dQ by float atomics on a GPU).
FUSED_CASES = [c for c in CASES if c.name in ("odd_lengths_causal", "gqa", "head_dim_128")]


@pytest.mark.parametrize(
  "case,implementation",
  [(c, impl) for c in CASES for impl in (*IMPLEMENTATIONS, "mosaic")]
  + [(c, "mosaic-fused") for c in FUSED_CASES],
  ids=lambda x: x if isinstance(x, str) else str(x),
)
def test_matches_reference(case: Case, implementation: str, rng):
  extra = {}
  if implementation == "mosaic-fused":
    implementation, extra = "mosaic", dict(deterministic_backward=False)
  if implementation == "mosaic":
    served = _mosaic_case(case)
    if served is None:
      q, k, v, _, bias, mask, options = _inputs(case, rng)
      q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
      with pytest.raises(NotImplementedError, match="mosaic"):
        flash_attention(q, k, v, bias, mask, implementation="mosaic", **options)
      implementation = ("mosaic", "triton")  # and the fallback gives the right answer
    else:
      case = served
  q, k, v, cotangent, bias, mask, options = _inputs(case, rng)
  ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, cotangent, bias, mask=mask, **options)

  def loss(q, k, v, bias):
    out, lse = flash_attention(
      q, k, v, bias, mask, return_residual=True, implementation=implementation, **options, **extra
    )
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), (out, lse)

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  grads, (out, lse) = jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)

  tol = TOLERANCE[case.dtype]
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == (case.batch, case.heads, case.t) and lse.dtype == jnp.float32
  assert rel_err(out, ref_out) < tol
  empty = ~np.isfinite(ref_lse)
  np.testing.assert_array_equal(~np.isfinite(np.asarray(lse)), empty)
  assert rel_err(np.asarray(lse)[~empty], ref_lse[~empty]) < tol
  names = ("dq", "dk", "dv", "dbias")[: len(grads)]
  for name, grad, ref in zip(names, grads, ref_grads, strict=True):
    assert grad.dtype == q.dtype
    assert rel_err(grad, ref) < tol, name
  if empty.any():
    # Rows with nothing to attend to: zero output and zero query gradient.
    rows = np.transpose(empty, (0, 2, 1))  # [B, T, N]
    assert np.all(np.asarray(out)[rows] == 0)
    assert np.all(np.asarray(grads[0])[rows] == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_lse_gradient(implementation, rng):
  """The log-sum-exp output is differentiable too (ring attention merges through it)."""
  q, k, v = (normal(rng, (1, 150, 2, 32)) for _ in range(3))
  weights = normal(rng, (1, 2, 150))
  options = dict(is_causal=True, query_seq_lengths=jnp.array([120], jnp.int32))

  def loss(fn, q, k, v):
    _, lse = fn(q, k, v)
    return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * weights)

  ours = jax.grad(
    lambda *a: loss(
      lambda *x: flash_attention(
        *x, return_residual=True, implementation=implementation, **options
      ),
      *a,
    ),
    argnums=(0, 1, 2),
  )(q, k, v)
  from pallas_attention import reference

  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
    w64 = to64(weights)

    def ref_loss(q, k, v):
      _, lse = reference.attention(q, k, v, **options)
      return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w64)

    expected = jax.grad(ref_loss, argnums=(0, 1, 2))(to64(q), to64(k), to64(v))
  for got, want in zip(ours, expected, strict=True):
    assert rel_err(got, np.asarray(want)) < 2e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_agrees_with_jax_nn(implementation, rng):
  """Same call, same answer as jax.nn.dot_product_attention (where rows are non-empty)."""
  q = normal(rng, (2, 130, 4, 32))
  k, v = normal(rng, (2, 170, 2, 32)), normal(rng, (2, 170, 2, 32))
  bias = normal(rng, (2, 1, 130, 170))
  mask = jnp.asarray(rng.random((1, 4, 130, 170)) < 0.8)
  options = dict(
    is_causal=True,
    local_window_size=(60, 10),
    query_seq_lengths=jnp.array([130, 100], jnp.int32),
    key_value_seq_lengths=jnp.array([170, 150], jnp.int32),
    scale=0.3,
  )
  ours, lse = flash_attention(
    q, k, v, bias, mask, implementation=implementation, return_residual=True, **options
  )
  theirs = jax.nn.dot_product_attention(q, k, v, bias, mask, implementation="xla", **options)
  # jax.nn averages the values on rows with nothing to attend to; we give zeros.
  visible = np.transpose(np.isfinite(np.asarray(lse)), (0, 2, 1))  # [B, T, N]
  assert visible.sum() > 0.8 * visible.size
  assert rel_err(np.asarray(ours)[visible], np.asarray(theirs)[visible]) < 2e-3
  assert np.all(np.asarray(ours)[~visible] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "mosaic", "mosaic-fused"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_protocol_shape(implementation, causal, head_dim, rng):
  """A benchmark-sized bf16 call (T = S = 2048) against the reference."""
  deterministic = implementation != "mosaic-fused"
  implementation = implementation.removesuffix("-fused")
  q, k, v, ct = (normal(rng, (1, 2048, 4, head_dim), jnp.bfloat16) for _ in range(4))
  ref_out, _, ref_grads = reference_with_grads(q, k, v, ct, is_causal=causal)
  out, grad_fn = jax.vjp(
    lambda q, k, v: flash_attention(
      q,
      k,
      v,
      is_causal=causal,
      implementation=implementation,
      deterministic_backward=deterministic,
    ),
    q,
    k,
    v,
  )
  assert rel_err(out, ref_out) < 2e-2
  for grad, ref in zip(grad_fn(ct), ref_grads, strict=True):
    assert rel_err(grad, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "mosaic"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_default_backward_is_deterministic(implementation, causal, rng):
  """deterministic_backward=True (the default): the same gradients, bit for bit, on
  every run. For mosaic, causal takes the two-kernel backward and non-causal (2048
  keys, head dim 128) the fused one with its dQ adds ordered by semaphores."""
  q, k, v, ct = (normal(rng, (2, 2048, 8, 128), jnp.bfloat16) for _ in range(4))

  @jax.jit
  def grads(q, k, v, ct):
    _, vjp = jax.vjp(
      lambda q, k, v: flash_attention(q, k, v, is_causal=causal, implementation=implementation),
      q,
      k,
      v,
    )
    return vjp(ct)

  first = [np.asarray(g) for g in grads(q, k, v, ct)]
  for _ in range(3):
    for a, b in zip(first, grads(q, k, v, ct), strict=True):
      np.testing.assert_array_equal(a, np.asarray(b))
