"""ring_attention on several CPU devices: against the float64 reference and the
single-device flash_attention, its static schedule, and the zigzag helpers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, normal, reference_with_grads, rel_err
from jax.sharding import PartitionSpec as P

from pallas_attention import (
  flash_attention,
  masks,
  ring,
  ring_attention,
  zigzag_permute,
  zigzag_unpermute,
)

AXIS = "sp"
# The CPU tests run on CPU devices (also on the GPU machine, where implementation=None
# would pick GPU kernels for them), so they name the blockwise implementation.
CPU_IMPL = "xla"


def _mesh(num_devices: int, platform: str = "cpu"):
  devices = jax.devices(platform)
  if len(devices) < num_devices:
    pytest.skip(f"needs {num_devices} {platform} devices, has {len(devices)}")
  return jax.sharding.Mesh(np.asarray(devices[:num_devices]), (AXIS,))


def _segment_mask(ids):
  return None if ids is None else (ids[:, :, None] == ids[:, None, :])[:, None]


def _ring_vjp(mesh, layout, q, k, v, ids, **kwargs):
  """``(out, vjp)`` of ring_attention over ``mesh`` on whole (unsharded) arrays."""
  num_shards = mesh.size
  reorder = functools.partial(zigzag_permute, num_shards=num_shards)
  restore = functools.partial(zigzag_unpermute, num_shards=num_shards)
  if layout == "contiguous":
    reorder = restore = lambda x: x

  def local(q, k, v, ids):
    segments = {} if ids is None else dict(q_segment_ids=ids, kv_segment_ids=ids)
    return ring_attention(q, k, v, axis_name=AXIS, layout=layout, **segments, **kwargs)

  # shard_map's default check_vma=True: every kernel declares the mesh axes its outputs vary over.
  sharded = jax.shard_map(local, mesh=mesh, in_specs=P(None, AXIS), out_specs=P(None, AXIS))
  ids = None if ids is None else reorder(ids)
  return jax.vjp(lambda q, k, v: restore(sharded(reorder(q), reorder(k), reorder(v), ids)), q, k, v)


def _ring_grads(mesh, layout, q, k, v, do, ids, **kwargs):
  """Out and ``(dq, dk, dv)`` of ``sum(out · do)``, jitted."""

  @jax.jit
  def run(q, k, v, do):
    out, vjp = _ring_vjp(mesh, layout, q, k, v, ids, **kwargs)
    return out, vjp(do)

  with jax.default_device(mesh.devices.flat[0]):
    return run(q, k, v, do)


CASES = {
  # name: (devices, layout, is_causal, local_window_size, heads N, kv heads K, segments)
  "causal-zigzag-gqa": (8, "zigzag", True, None, 4, 2, False),
  "causal-contiguous": (8, "contiguous", True, None, 2, 2, False),
  "full-contiguous-mqa-segments": (4, "contiguous", False, None, 4, 1, True),
  "causal-zigzag-segments": (4, "zigzag", True, None, 2, 1, True),
  "window-contiguous": (8, "contiguous", True, (40, 0), 2, 2, False),
  "window-zigzag": (4, "zigzag", False, (24, 16), 2, 2, False),
}


@pytest.mark.parametrize("case", CASES)
def test_ring_matches_single_device(case, rng):
  """Out and dq, dk, dv of the ring equal the float64 reference and single-device
  flash_attention on the gathered sequence."""
  num_devices, layout, causal, window, heads, kv_heads, segments = CASES[case]
  batch, seqlen, head_dim = 2, 256, 32
  q = normal(rng, (batch, seqlen, heads, head_dim))
  k, v = (normal(rng, (batch, seqlen, kv_heads, head_dim)) for _ in range(2))
  do = normal(rng, q.shape)
  ids = None
  if segments:  # packed documents of random lengths, some shorter than a shard
    ids = jnp.asarray(np.sort(rng.integers(0, 7, (batch, seqlen)), axis=1), jnp.int32)
  options = dict(is_causal=causal, local_window_size=window)

  mesh = _mesh(num_devices)
  out, grads = _ring_grads(mesh, layout, q, k, v, do, ids, implementation=CPU_IMPL, **options)
  with jax.default_device(mesh.devices.flat[0]):
    single, single_vjp = jax.vjp(
      lambda q, k, v: flash_attention(
        q, k, v, mask=_segment_mask(ids), implementation=CPU_IMPL, **options
      ),
      q,
      k,
      v,
    )
    single_grads = single_vjp(do)
  want_out, _, want_grads = reference_with_grads(q, k, v, do, mask=_segment_mask(ids), **options)

  for name, got, single_got, want in zip(
    ("out", "dq", "dk", "dv"),
    (out, *grads),
    (single, *single_grads),
    (want_out, *want_grads),
    strict=True,
  ):
    assert got.shape == want.shape and got.dtype == q.dtype, name
    assert rel_err(got, want) < TOLERANCE[jnp.float32], name
    # Equal to the one-device call up to the order of float32 sums.
    assert rel_err(got, single_got) < 2e-5, name


def test_one_device_is_the_plain_call(rng):
  """A mesh of one device runs exactly flash_attention's kernels: same bits
  (unbatched inputs, causal, zigzag requested)."""
  q, k, v, do = (normal(rng, (128, 2, 32)) for _ in range(4))
  mesh = _mesh(1)
  with jax.default_device(mesh.devices.flat[0]):
    options = dict(is_causal=True, implementation=CPU_IMPL)
    sharded = jax.shard_map(
      lambda q, k, v: ring_attention(q, k, v, axis_name=AXIS, layout="zigzag", **options),
      mesh=mesh,
      in_specs=P(AXIS),
      out_specs=P(AXIS),
    )
    out, vjp = jax.vjp(jax.jit(sharded), q, k, v)
    want, want_vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, **options), q, k, v)
    for got, expected in zip((out, *vjp(do)), (want, *want_vjp(do)), strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_flash_attention_inside_shard_map(rng):
  """The blockwise kernels' loop carries type-check under shard_map's check_vma."""
  q, k, v = (normal(rng, (4, 64, 2, 32)) for _ in range(3))
  mesh = _mesh(4)
  with jax.default_device(mesh.devices.flat[0]):
    sharded = jax.shard_map(
      lambda q, k, v: flash_attention(q, k, v, is_causal=True, implementation=CPU_IMPL),
      mesh=mesh,
      in_specs=P(AXIS),
      out_specs=P(AXIS),
    )
    got = jax.jit(sharded)(q, k, v)
    want = flash_attention(q, k, v, is_causal=True, implementation=CPU_IMPL)
  assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("implementation", ["triton", "mosaic"])
def test_gpu_kernels_type_check_under_shard_map(implementation):
  """The Pallas GPU kernels' outputs carry the mesh axes they vary over, so ring attention
  (forward and its custom backward) traces under shard_map's default check_vma=True.

  Tracing only: the CPU interpreters cannot run under check_vma (Pallas' interpret mode
  evaluates the kernel with its inputs' types stripped), the GPU test below runs it.
  """
  mesh = _mesh(2)
  spec = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)

  def local(q, k, v):
    return ring_attention(
      q, k, v, axis_name=AXIS, is_causal=True, layout="zigzag", implementation=implementation
    )

  sharded = jax.shard_map(local, mesh=mesh, in_specs=P(None, AXIS), out_specs=P(None, AXIS))
  loss = lambda q, k, v: sharded(q, k, v).astype(jnp.float32).sum()
  grads = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), spec, spec, spec)
  assert [(g.shape, g.dtype) for g in grads] == [(spec.shape, spec.dtype)] * 3


# ---- The static schedule, against visibility computed directly ----------------------


def _numpy_visible(rows, cols, spec: masks.MaskSpec):
  """jax.nn's causal/window semantics on global positions (no lengths)."""
  i, j = rows[:, None], cols[None, :]
  keep = np.ones((len(rows), len(cols)), bool)
  if spec.causal:
    keep &= j <= i
  if spec.window_left is not None:
    keep &= j >= i - spec.window_left
  if spec.window_right is not None:
    keep &= j <= i + spec.window_right
  return keep


def _positions(layout, shard, num_shards, length):
  """Global positions of a shard's local rows."""
  order = np.arange(num_shards * length)
  if layout == "zigzag":
    order = np.asarray(zigzag_permute(order[None], num_shards))[0]
  return order[shard * length : (shard + 1) * length]


SCHEDULE_SPECS = [
  masks.MaskSpec(),
  masks.MaskSpec(causal=True),
  masks.MaskSpec(causal=True, window_left=5),
  masks.MaskSpec(causal=True, window_left=40),
  masks.MaskSpec(window_left=7, window_right=30),
  masks.MaskSpec(window_left=None, window_right=3),
  masks.MaskSpec(window_left=0, window_right=0),
]


@pytest.mark.parametrize("spec", SCHEDULE_SPECS, ids=repr)
@pytest.mark.parametrize("layout", ring.LAYOUTS)
@pytest.mark.parametrize("num_shards,t,s", [(1, 16, 16), (2, 16, 16), (3, 8, 8), (4, 12, 8)])
def test_schedule_covers_visible_pairs_once(spec, layout, num_shards, t, s):
  """Every visible (query, key) pair is computed exactly once, no masked pair is, and
  no kernel call is fully masked (those steps are skipped)."""
  schedule = ring._schedule(spec, layout, num_shards, t, s)
  q_total = num_shards * t
  k_total = num_shards * s
  covered = np.zeros((q_total, k_total), np.int32)
  for step, row in enumerate(schedule.table):
    for device, work_id in enumerate(row):
      source = (device - step) % num_shards
      rows = _positions(layout, device, num_shards, t)
      cols = _positions(layout, source, num_shards, s)
      for block in schedule.works[work_id]:
        block_rows = rows[block.q_start : block.q_start + block.q_size]
        block_cols = cols[block.kv_start : block.kv_start + block.kv_size]
        local = _numpy_visible(np.arange(block.q_size), np.arange(block.kv_size), block.spec)
        assert local.any(), f"a fully masked block is computed: {block}"
        covered[np.ix_(block_rows, block_cols)] += local
  want = _numpy_visible(np.arange(q_total), np.arange(k_total), spec).astype(np.int32)
  np.testing.assert_array_equal(covered, want)


def _work_per_device(spec, layout, num_shards, length):
  schedule = ring._schedule(spec, layout, num_shards, length, length)
  work = np.zeros(num_shards, np.int64)
  for row in schedule.table:
    for device, work_id in enumerate(row):
      for block in schedule.works[work_id]:
        rows, cols = np.arange(block.q_size), np.arange(block.kv_size)
        work[device] += _numpy_visible(rows, cols, block.spec).sum()
  return work


def test_zigzag_balances_causal_work():
  spec = masks.MaskSpec(causal=True)
  zigzag = _work_per_device(spec, "zigzag", 8, 32)
  assert np.all(zigzag == zigzag[0])
  contiguous = _work_per_device(spec, "contiguous", 8, 32)
  assert contiguous[-1] > 10 * contiguous[0]
  assert zigzag.sum() == contiguous.sum()


def test_causal_schedule_skips_masked_steps_and_uses_few_kernels():
  """Contiguous causal: device p computes at steps 0 … p only. Zigzag: one call per
  step and device, unmasked after step 0, of half a block."""
  spec = masks.MaskSpec(causal=True)
  schedule = ring._schedule(spec, "contiguous", 4, 16, 16)
  busy = [[bool(schedule.works[w]) for w in row] for row in schedule.table]
  assert busy == [[step <= device for device in range(4)] for step in range(4)]
  schedule = ring._schedule(spec, "zigzag", 4, 16, 16)
  for step, row in enumerate(schedule.table):
    for work_id in row:
      (block,) = schedule.works[work_id]
      if step == 0:
        assert block.spec == masks.MaskSpec(causal=True) and block.q_size == block.kv_size == 16
      else:
        assert block.spec == masks.MaskSpec() and block.q_size * block.kv_size == 16 * 8


# ---- The zigzag helpers and errors ----------------------------------------------------


def test_zigzag_permute_order_and_inverse(rng):
  x = jnp.arange(8)[None]
  np.testing.assert_array_equal(zigzag_permute(x, 2), [[0, 1, 6, 7, 2, 3, 4, 5]])
  y = normal(rng, (2, 48, 3, 4))
  for num_shards in (1, 2, 3, 4, 8):
    if 48 % (2 * num_shards):
      continue
    permuted = zigzag_permute(y, num_shards)
    assert not num_shards > 1 or not np.array_equal(permuted, y)
    np.testing.assert_array_equal(zigzag_unpermute(permuted, num_shards), y)
    np.testing.assert_array_equal(zigzag_permute(zigzag_unpermute(y, num_shards), num_shards), y)
  np.testing.assert_array_equal(
    zigzag_permute(jnp.arange(12).reshape(3, 4), 1, axis=-1), jnp.arange(12).reshape(3, 4)
  )


def test_zigzag_permute_errors():
  with pytest.raises(ValueError, match="2 · num_shards = 6"):
    zigzag_permute(jnp.zeros((1, 8)), 3)
  with pytest.raises(ValueError, match="num_shards"):
    zigzag_permute(jnp.zeros((1, 8)), 0)
  with pytest.raises(ValueError, match="axis"):
    zigzag_unpermute(jnp.zeros((1, 8)), 2, axis=2)


def _call_sharded(num_devices, seqlen, **kwargs):
  mesh = _mesh(num_devices)
  q = jnp.zeros((1, seqlen, 2, 16))
  sharded = jax.shard_map(
    lambda q: ring_attention(q, q, q, axis_name=AXIS, **{"implementation": CPU_IMPL, **kwargs}),
    mesh=mesh,
    in_specs=P(None, AXIS),
    out_specs=P(None, AXIS),
  )
  with jax.default_device(mesh.devices.flat[0]):
    return jax.eval_shape(sharded, q)


def test_errors():
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="axis_name: 'sp' is not a bound mesh axis"):
    ring_attention(q, q, q, axis_name=AXIS)
  with pytest.raises(ValueError, match="zigzag layout needs even shard lengths"):
    _call_sharded(2, 6, layout="zigzag")
  with pytest.raises(ValueError, match="layout"):
    _call_sharded(2, 8, layout="striped")
  with pytest.raises(ValueError, match="give both or neither"):
    _call_sharded(2, 8, q_segment_ids=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="q_segment_ids"):
    ids = jnp.zeros((1, 3), jnp.int32)
    _call_sharded(2, 8, q_segment_ids=ids, kv_segment_ids=ids)
  with pytest.raises(ValueError, match="implementation"):
    _call_sharded(2, 8, implementation="cuda")
  assert _call_sharded(2, 8, layout="zigzag", is_causal=True).shape == (1, 8, 2, 16)


@pytest.mark.gpu
def test_ring_on_gpus(rng):
  """Every GPU of the machine in one ring (one GPU: the one-device path), bf16,
  head_dim 128, causal zigzag, against the float64 reference."""
  num_devices = len(jax.devices("gpu"))
  mesh = _mesh(num_devices, "gpu")
  seqlen = 1024 * num_devices
  q, k, v, do = (normal(rng, (1, seqlen, 4, 128), jnp.bfloat16) for _ in range(4))
  out, grads = _ring_grads(mesh, "zigzag", q, k, v, do, None, is_causal=True)
  want_out, _, want_grads = reference_with_grads(q, k, v, do, is_causal=True)
  results = zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads), strict=True)
  for name, got, want in results:
    assert rel_err(got, want) < TOLERANCE[jnp.bfloat16], name
